"""A throwaway sshd on loopback addresses, so ``ray up`` with Ray's ``local`` provider can
run for real on one machine (``configs/cluster/local-loopback.yaml``).

Where it sits: outside any request path; ``tests/integration/test_ray_up_local.py`` uses
it. Ray's ``local`` provider reaches every node over SSH (``ssh -tt user@IP bash --login
-c -i '...'``, ``rsync`` for files) and gives each node its own IP, so one machine plays
a head (127.0.0.2) and a worker (127.0.0.3). 127.0.0.1 cannot be a node: Ray rewrites
it to the machine's routable address (``services.resolve_ip_for_localhost``).

``LoopbackSSHD`` starts ``/usr/sbin/sshd -D`` with a config of its own in a temp
directory: listening on those addresses only, a fresh host key, a fresh client key
pair that is the only authorised key, public-key login only. It runs in namespaces of
its own (``unshare --pid --mount``), which keep it off the rest of the machine:

- The user's home directory is an overlay there (the real one below, a temp directory
  on top): everything Ray writes under ``~`` on a "node" (``ray_bootstrap_config.yaml``,
  ``ray_bootstrap_key.pem``, file mounts) lands in the temp directory, and the
  ``.bashrc``/``.profile`` on top put this virtualenv's ``bin`` first on ``PATH``, so
  Ray's login shells find ``ray``. The real home is not written. (``HOME`` alone
  cannot be redirected: ``ssh -i ~/ray_bootstrap_key.pem``, which the autoscaler runs
  on the head, expands ``~`` from the password database.)
- ``ray down`` runs ``ray stop`` on the head, and ``ray stop`` kills every Ray process
  it can see by name; in the PID namespace that is this cluster's only, not other
  users' Ray on a shared machine. Stopping sshd ends the namespace, so nothing it
  started can outlive ``stop()``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ADDRESSES = ("127.0.0.2", "127.0.0.3")
SSHD = "/usr/sbin/sshd"
PACKAGES = ("openssh-server", "openssh-client", "rsync")


def missing_tools() -> list[str]:
    """Programs the loopback cluster needs that this machine lacks."""
    need = {"sshd": SSHD, "ssh": "ssh", "ssh-keygen": "ssh-keygen", "rsync": "rsync",
            "unshare": "unshare"}
    return [name for name, prog in need.items()
            if not (os.access(prog, os.X_OK) if prog.startswith("/") else shutil.which(prog))]


def ensure_tools(timeout: float = 600.0) -> str | None:
    """Install openssh-server, openssh-client and rsync with apt-get when missing.

    Returns None when everything is present, else why it cannot be (not root, no
    apt-get, the install failed). Daemons are kept from starting during the install
    (a temporary ``policy-rc.d`` that says no): the package's own sshd on port 22 of
    every address would take the port this one needs.
    """
    missing = missing_tools()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"missing {', '.join(missing)} and not root, so cannot apt-get install them"
    apt = shutil.which("apt-get")
    if apt is None:
        return f"missing {', '.join(missing)} and there is no apt-get to install them"
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        log = []
        for cmd in ([apt, "update", "-qq"],
                    [apt, "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            log.append(f"$ {' '.join(cmd)} -> {run.returncode}\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
            if run.returncode != 0 and cmd[1] == "install":
                return "apt-get install failed:\n" + "\n".join(log)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get failed: {exc}"
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    still = missing_tools()
    return f"still missing after apt-get: {', '.join(still)}" if still else None


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nothing listens on, on any address."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LoopbackSSHD:
    """An sshd for ``ray up`` on loopback, everything under ``root`` (a fresh directory).

    ``key`` is the private key Ray's ``auth.ssh_private_key`` names; ``home_upper`` holds
    what sessions wrote under ``~``. ``port`` must be 22: Ray's SSH runner has no port
    setting.
    """

    def __init__(self, root: str | Path, *, addresses=ADDRESSES, port: int = 22,
                 path_dirs: list[str] | None = None, user: str | None = None):
        self.root = Path(root)
        self.addresses = tuple(addresses)
        self.port = port
        self.user = user or getpass.getuser()
        self.path_dirs = path_dirs if path_dirs is not None else [str(Path(sys.prefix) / "bin")]
        self.key = self.root / "id_ed25519"
        self.home = Path(pwd.getpwnam(self.user).pw_dir)  # seen by sessions as an overlay
        self.home_upper = self.root / "home"  # what sessions wrote under ~
        self.config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"
        self.proc: subprocess.Popen | None = None
        self._ns: str | None = None

    # ---- start -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> LoopbackSSHD:
        taken = [a for a in self.addresses if not port_free(a, self.port)]
        if taken:
            raise RuntimeError(f"port {self.port} is taken on {', '.join(taken)} (a system sshd?)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.home_upper.mkdir(exist_ok=True)
        (self.root / "home-work").mkdir(exist_ok=True)
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "specfleet-loopback"]
        subprocess.run([*keygen, "-f", str(self.key)], check=True)
        subprocess.run([*keygen, "-f", str(self.root / "host_ed25519")], check=True)
        (self.root / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        profile = f'export PATH="{":".join(self.path_dirs)}:$PATH"\n'
        (self.home_upper / ".bashrc").write_text(profile)  # Ray's login shells source ~/.bashrc
        (self.home_upper / ".profile").write_text(profile)  # any other login shell
        lines = [f"ListenAddress {a}:{self.port}" for a in self.addresses] + [
            f"HostKey {self.root / 'host_ed25519'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the key files live under /tmp (world-writable, sticky)
            "PermitUserEnvironment no",
            "MaxStartups 64",
            "MaxSessions 64",  # Ray multiplexes commands over one connection (ControlMaster)
            "PrintMotd no",
            "LogLevel ERROR",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        check = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t rejected {self.config}: {check.stderr.strip()}")
        overlay = (f"lowerdir={self.home},upperdir={self.home_upper},"
                   f"workdir={self.root / 'home-work'}")
        inner = (f"mount -t overlay overlay -o {_quote(overlay)} {_quote(str(self.home))} && "
                 f"exec {SSHD} -D -e -f {_quote(str(self.config))}")
        with open(self.log, "ab") as log:
            # --mount-proc implies a private mount namespace: the overlay is not seen outside.
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", inner],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not all(self._accepts(a) for a in self.addresses):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not come up: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        self._ns = self._namespace()
        return self

    def _accepts(self, address: str) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((address, self.port), 0.5):
            return True
        return False

    def _namespace(self) -> str | None:
        """The PID namespace sshd runs in (the child of ``unshare``)."""
        for pid in _pids():
            if _ppid(pid) == self.proc.pid:
                with contextlib.suppress(OSError):
                    return os.readlink(f"/proc/{pid}/ns/pid")
        return None

    # ---- what runs in it ------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        """pid -> command line of every process in sshd's namespace (sshd included)."""
        if self._ns is None:
            return {}
        out = {}
        for pid in _pids():
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") != self._ns:
                    continue
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if cmd:  # zombies and kernel threads have none
                out[pid] = cmd
        return out

    def non_sshd_processes(self) -> dict[int, str]:
        """What is left in the namespace besides sshd and its per-connection children."""
        return {p: c for p, c in self.processes().items() if not c.startswith(("sshd", SSHD))}

    def ssh(self, address: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``command`` on ``address`` as Ray would (login shell), for checks."""
        return subprocess.run(
            ["ssh", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={os.devnull}",
             "-o", "LogLevel=ERROR", f"{self.user}@{address}", f"bash --login -c {_quote(command)}"],
            capture_output=True, text=True, timeout=timeout,
        )

    # ---- stop ------------------------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> None:
        """End sshd, and with it every process still in its namespace."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # sshd too (its group); unshare follows
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        deadline = time.monotonic() + timeout  # the kernel kills the namespace's processes
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> LoopbackSSHD:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies, so a
    killed test run cannot leave sshd (and the cluster in its namespace) behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])
