"""Generated structured records: the zoo's ``data`` domain.

Where it sits: ``specfleet.zoo.corpus`` calls ``generate_documents`` while building
the training text; nothing at serving time uses it.

Why generated: the standard library carries code and prose but little data, and
structured records (JSON events, CSV tables, access and application logs) are a
domain where a specialist drafter shines, since keys, formats and field order
repeat while values vary. Each document is one format with a few dozen records whose
fields are consistent and realistic (monotonic timestamps, plausible latencies and
status codes), from a seeded ``random.Random`` so the text is reproducible.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta

_FIRST = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
          "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "wendy",
          "yusuf", "zoe", "liam", "mia", "noah", "emma", "lucas", "sofia", "mateo", "aiko", "ravi"]
_LAST = ["smith", "jones", "garcia", "miller", "davis", "lopez", "wilson", "anderson", "taylor",
         "thomas", "moore", "martin", "lee", "walker", "hall", "young", "king", "wright", "scott",
         "green", "baker", "adams", "nelson", "hill", "campbell", "mitchell", "roberts", "kim"]
_CITIES = [("Berlin", "DE"), ("Paris", "FR"), ("Madrid", "ES"), ("Rome", "IT"),
           ("London", "GB"), ("Dublin", "IE"), ("Warsaw", "PL"), ("Vienna", "AT"),
           ("New York", "US"), ("Chicago", "US"), ("Toronto", "CA"), ("Austin", "US"),
           ("Tokyo", "JP"), ("Seoul", "KR"), ("Sydney", "AU"), ("Mumbai", "IN"),
           ("Sao Paulo", "BR"), ("Mexico City", "MX"), ("Lagos", "NG"), ("Oslo", "NO")]
_CURRENCY = {"DE": "EUR", "FR": "EUR", "ES": "EUR", "IT": "EUR", "IE": "EUR", "AT": "EUR",
             "GB": "GBP", "PL": "PLN", "US": "USD", "CA": "CAD", "JP": "JPY", "KR": "KRW",
             "AU": "AUD", "IN": "INR", "BR": "BRL", "MX": "MXN", "NG": "NGN", "NO": "NOK"}
_EVENTS = ["login", "logout", "page_view", "add_to_cart", "checkout", "search", "signup",
           "password_reset", "purchase", "refund"]
_PRODUCTS = [("SKU-1001", "USB-C cable 1m", 9.99), ("SKU-1002", "Wireless mouse", 24.5),
             ("SKU-1003", "Mechanical keyboard", 89.0), ("SKU-1004", "27in monitor", 229.0),
             ("SKU-1005", "Laptop stand", 34.9), ("SKU-1006", "Webcam 1080p", 49.95),
             ("SKU-1007", "Noise cancelling headphones", 179.0), ("SKU-1008", "HDMI adapter", 14.0),
             ("SKU-1009", "Desk lamp", 39.99), ("SKU-1010", "Portable SSD 1TB", 99.0)]
_PATHS = ["/", "/index.html", "/login", "/api/v1/users/{id}", "/api/v1/orders/{id}",
          "/api/v1/orders", "/api/v1/search?q={word}", "/static/app.{hash}.js",
          "/static/style.{hash}.css", "/products/{id}", "/cart", "/checkout", "/health"]
_WORDS = ["shoes", "laptop", "coffee", "chair", "lamp", "phone", "book", "camera", "desk"]
_AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0",
           "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Safari/605.1.15",
           "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
           "curl/8.5.0", "python-requests/2.31.0", "Go-http-client/1.1"]
_SERVICES = {"payments": ["charge succeeded", "charge declined", "refund issued"],
             "auth": ["token issued", "token expired", "login failed"],
             "orders": ["order created", "order shipped", "order cancelled"],
             "inventory": ["stock reserved", "stock released", "low stock"],
             "search": ["query served", "index refreshed", "cache miss"]}
_SENSORS = ["boiler-room", "server-rack-a", "server-rack-b", "greenhouse", "cold-store",
            "lobby", "roof", "garage"]


def _start(rng: random.Random) -> datetime:
    return datetime(2023, 1, 1) + timedelta(seconds=rng.randrange(0, 2 * 365 * 86400))


def _user(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)}.{rng.choice(_LAST)}"


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    first = rng.randrange(11, 223)
    return f"{first}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _json_events(rng: random.Random, n: int) -> str:
    ts = _start(rng)
    lines = []
    for _ in range(n):
        ts += timedelta(milliseconds=rng.randrange(50, 90_000))
        city, country = rng.choice(_CITIES)
        lines.append(json.dumps({
            "id": rng.randrange(10_000, 9_999_999),
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "user": _user(rng),
            "event": rng.choice(_EVENTS),
            "ip": _ip(rng),
            "city": city,
            "country": country,
            "duration_ms": int(rng.lognormvariate(4.5, 0.8)),
            "ok": rng.random() > 0.07,
        }))
    return "\n".join(lines)


def _json_order(rng: random.Random, n: int) -> str:
    city, country = rng.choice(_CITIES)
    items = []
    for sku, title, price in rng.sample(_PRODUCTS, k=min(len(_PRODUCTS), max(1, n // 6))):
        items.append({"sku": sku, "title": title, "qty": rng.randint(1, 4), "unit_price": price})
    order = {
        "order_id": f"ORD-{rng.randrange(100000, 999999)}",
        "created_at": _start(rng).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "customer": {"id": rng.randrange(1000, 99999), "name": _user(rng).replace(".", " ").title(),
                     "email": f"{_user(rng)}@example.com"},
        "shipping": {"city": city, "country": country, "express": rng.random() < 0.3},
        "items": items,
        "currency": _CURRENCY[country],
        "total": round(sum(i["qty"] * i["unit_price"] for i in items), 2),
        "status": rng.choice(["pending", "paid", "shipped", "delivered", "cancelled"]),
    }
    return json.dumps(order, indent=2)


def _csv_orders(rng: random.Random, n: int) -> str:
    day = _start(rng).date()
    rows = ["order_id,date,customer,sku,qty,unit_price,currency,country"]
    for _ in range(n):
        day += timedelta(days=rng.random() < 0.3)
        sku, _title, price = rng.choice(_PRODUCTS)
        _city, country = rng.choice(_CITIES)
        rows.append(f"{rng.randrange(100000, 999999)},{day.isoformat()},{_user(rng)},{sku},"
                    f"{rng.randint(1, 5)},{price:.2f},{_CURRENCY[country]},{country}")
    return "\n".join(rows)


def _csv_sensors(rng: random.Random, n: int) -> str:
    ts = _start(rng).replace(second=0, microsecond=0)
    sensor = rng.choice(_SENSORS)
    temp, hum, battery = rng.uniform(-5, 35), rng.uniform(20, 90), rng.uniform(60, 100)
    rows = ["sensor,timestamp,temperature_c,humidity_pct,battery_pct"]
    for _ in range(n):
        ts += timedelta(minutes=5)
        temp += rng.gauss(0, 0.3)
        hum = min(100.0, max(0.0, hum + rng.gauss(0, 0.8)))
        battery = max(0.0, battery - rng.random() * 0.05)
        rows.append(f"{sensor},{ts.isoformat()},{temp:.2f},{hum:.1f},{battery:.1f}")
    return "\n".join(rows)


def _access_log(rng: random.Random, n: int) -> str:
    ts = _start(rng)
    lines = []
    for _ in range(n):
        ts += timedelta(milliseconds=rng.randrange(5, 20_000))
        path = rng.choice(_PATHS).format(id=rng.randrange(1, 50000), word=rng.choice(_WORDS),
                                         hash=f"{rng.getrandbits(32):08x}")
        writes = path in ("/login", "/api/v1/orders", "/checkout")
        method = "POST" if writes and rng.random() < 0.7 else "GET"
        status = rng.choices([200, 201, 204, 301, 304, 400, 401, 403, 404, 500, 502],
                             weights=[70, 4, 2, 2, 8, 3, 2, 1, 5, 2, 1])[0]
        size = 0 if status in (204, 304) else int(rng.lognormvariate(7.5, 1.2))
        lines.append(f'{_ip(rng)} - - [{ts.strftime("%d/%b/%Y:%H:%M:%S")} +0000] '
                     f'"{method} {path} HTTP/1.1" {status} {size} "-" "{rng.choice(_AGENTS)}"')
    return "\n".join(lines)


def _app_log(rng: random.Random, n: int) -> str:
    ts = _start(rng)
    service = rng.choice(sorted(_SERVICES))
    lines = []
    for _ in range(n):
        ts += timedelta(milliseconds=rng.randrange(1, 5000))
        level = rng.choices(["DEBUG", "INFO", "WARNING", "ERROR"], weights=[10, 70, 15, 5])[0]
        message = rng.choice(_SERVICES[service])
        _city, country = rng.choice(_CITIES)
        lines.append(
            f"{ts.strftime('%Y-%m-%d %H:%M:%S')},{ts.microsecond // 1000:03d} {level} "
            f"[worker-{rng.randrange(1, 9)}] {service}.service: {message} "
            f"request_id={rng.getrandbits(48):012x} user={_user(rng)} "
            f"amount={rng.uniform(1, 500):.2f} currency={_CURRENCY[country]} "
            f"latency_ms={int(rng.lognormvariate(3.5, 0.9))}"
        )
    return "\n".join(lines)


_FORMATS = [_json_events, _json_order, _csv_orders, _csv_sensors, _access_log, _app_log]


def generate_documents(budget_chars: int, seed: str) -> list[str]:
    """Documents of records, each one format, until ``budget_chars`` characters."""
    rng = random.Random(seed)
    docs, total = [], 0
    while total < budget_chars:
        fmt = rng.choice(_FORMATS)
        doc = fmt(rng, rng.randint(8, 40))
        docs.append(doc)
        total += len(doc)
    return docs
