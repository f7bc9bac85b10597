"""A throwaway S3 object store on 127.0.0.1: OpenStack Swift from Debian with the s3api and tempauth middlewares.

Plain code without pytest, shared by the test fixtures (tests/conftest.py) and whatever else wants a
real S3 endpoint. One node, one replica, four processes (account, container, object, proxy) on free
ports; everything they write (configs, rings, data, logs) stays in the scratch directory. The
scratch directory needs user xattrs (ext4 has them; tmpfs only from Linux 6.6). Failures raise
SwiftError.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from snapferry_testkit.loopback import HOST, accepts, free_port

# The swift packages install into Debian's python, not into whatever python runs the tests.
PYTHON = Path("/usr/bin/python3")
SERVERS = ("account", "container", "object", "proxy")
PACKAGES = ("swift", "swift-proxy", "swift-object", "swift-container", "swift-account")
# The servers read the hash path prefix/suffix and storage policy 0 from here whatever swift_dir
# says (swift.common.utils.SWIFT_CONF_FILE); the swift package ships it.
SWIFT_CONF = Path("/etc/swift/swift.conf")
REGION = "us-east-1"
# tempauth users: ACCOUNT:USER with a key. `test:tester` is admin of its account, so owns its
# buckets; `other:nobody` is no admin anywhere, so every bucket call it makes is refused.
ACCESS_KEY, SECRET_KEY = "test:tester", "testing"
OTHER_ACCESS_KEY, OTHER_SECRET_KEY = "other:nobody", "nothing"
# s3api keeps the parts of a multipart upload in this container beside the bucket's.
SEGMENTS_SUFFIX = "+segments"

_PR_SET_PDEATHSIG = 1

# Run once by Debian's python: one ring each, part power 10, 1 replica, 1 device. In one process
# this takes about a second; nine swift-ring-builder calls take about nine.
_RING_SCRIPT = """
import sys
from swift.common.ring import RingBuilder
swift_dir = sys.argv[1]
for name, port in zip(("account", "container", "object"), sys.argv[2:]):
    builder = RingBuilder(10, 1, 1)
    builder.add_dev({"id": 0, "region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port), "device": "d0", "weight": 100})
    builder.rebalance()
    builder.get_ring().save(f"{swift_dir}/{name}.ring.gz")
"""

_PROXY_PIPELINE = (
    "catch_errors gatekeeper proxy-logging cache listing_formats s3api tempauth copy container-quotas"
    " slo dlo versioned_writes proxy-logging proxy-server"
)


class SwiftError(RuntimeError):
    """The store cannot be configured, started or reached."""


def installed() -> bool:
    """Whether the Debian swift packages (PACKAGES) are here."""
    return PYTHON.exists() and SWIFT_CONF.exists() and all(Path(f"/usr/bin/swift-{name}-server").exists() for name in SERVERS)


def _die_with_parent() -> None:
    # A test run killed with SIGKILL would otherwise leave four servers behind, holding ports.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop_process(process: subprocess.Popen[bytes], kill: bool) -> None:
    if process.poll() is None:
        if kill:
            process.kill()
        else:
            process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


class SwiftServer:
    """Swift with S3 in front, its files under `base`; `start()` runs it, `stop()` ends it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.etc = base / "etc"
        self.devices = base / "devices"
        self.logs = base / "logs"
        self.pylib = base / "pylib"
        self.ports = {name: free_port() for name in SERVERS}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.region = REGION
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.other_access_key, self.other_secret_key = OTHER_ACCESS_KEY, OTHER_SECRET_KEY

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['proxy']}"

    def log(self, name: str) -> Path:
        """The log file of one server: its start-up, errors and one line per request it served."""
        return self.logs / f"{name}.log"

    # Setup

    def start(self, timeout: float = 60) -> SwiftServer:
        """Write configs and rings, start the four servers and wait until an S3 call succeeds."""
        if not installed():
            raise SwiftError(f"the swift packages are not installed: apt-get install {' '.join(PACKAGES)}")
        for directory in (self.etc, self.devices / "d0", self.logs, self.pylib):
            directory.mkdir(parents=True, exist_ok=True)
        # The cache filter is imported by the proxy from here alone: the test interpreter's
        # site-packages may hold other eventlet or six versions than Debian's python3 needs.
        shutil.copyfile(Path(__file__).with_name("swift_cache.py"), self.pylib / "swift_cache.py")
        for name in SERVERS:
            (self.etc / f"{name}-server.conf").write_text(self._config(name))
        rings = [str(PYTHON), "-c", _RING_SCRIPT, str(self.etc), *(str(self.ports[name]) for name in SERVERS[:3])]
        built = subprocess.run(rings, env=self._server_env(), capture_output=True, text=True, timeout=120, check=False)
        if built.returncode != 0:
            raise SwiftError(f"building the rings failed: {built.stderr[-3000:]}")
        for name in SERVERS:
            self._spawn(name)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self, name: str) -> str:
        default = [
            "[DEFAULT]",
            f"bind_ip = {HOST}",
            f"bind_port = {self.ports[name]}",
            # One process per server: about 310 MB in all instead of one worker per CPU each.
            "workers = 0",
            f"swift_dir = {self.etc}",
            f"devices = {self.devices}",
            "mount_check = false",
            # Servers log to syslog (/dev/log) whatever else they do: send that to the discard
            # port instead, and take the console copy (-v) into the log files.
            f"log_udp_host = {HOST}",
            "log_udp_port = 9",
            f"log_name = swift-{name}",
        ]
        if name != "proxy":
            app = ["[pipeline:main]", f"pipeline = {name}-server", "", f"[app:{name}-server]", f"use = egg:swift#{name}"]
            return "\n".join([*default, "", *app, ""])
        proxy = [
            "",
            "[pipeline:main]",
            f"pipeline = {_PROXY_PIPELINE}",
            "",
            "[app:proxy-server]",
            "use = egg:swift#proxy",
            # The first S3 call of a user creates its Swift account.
            "account_autocreate = true",
            "",
            "[filter:cache]",
            "paste.filter_factory = swift_cache:filter_factory",
            "",
            "[filter:s3api]",
            "use = egg:swift#s3api",
            f"location = {REGION}",
            "",
            "[filter:tempauth]",
            "use = egg:swift#tempauth",
            f"user_test_tester = {SECRET_KEY} .admin",
            f"user_other_nobody = {OTHER_SECRET_KEY}",
            "",
        ]
        for middleware in ("catch_errors", "gatekeeper", "proxy-logging", "listing_formats", "copy", "slo", "dlo", "versioned_writes"):
            proxy += [f"[filter:{middleware}]", f"use = egg:swift#{middleware.replace('-', '_')}", ""]
        proxy += ["[filter:container-quotas]", "use = egg:swift#container_quotas", ""]
        return "\n".join(default + proxy)

    def _server_env(self) -> dict[str, str]:
        # Nothing of the test interpreter's environment (pyenv, PYTHONPATH, PYTHONHOME) leaks into Debian's python.
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(self.pylib), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}

    def _spawn(self, name: str) -> None:
        argv = [str(PYTHON), f"/usr/bin/swift-{name}-server", str(self.etc / f"{name}-server.conf"), "-v"]
        # Appending: a restarted proxy keeps the log of the one before.
        with open(self.log(name), "ab") as log_file:
            self.processes[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._server_env(),
                preexec_fn=_die_with_parent,
            )

    def _died(self) -> str | None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                return f"swift {name} server exited with {process.returncode}: {self.log(name).read_text(errors='replace')[-3000:]}"
        return None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Ports first (the servers listen 1-10 s after they start), then one S3 call through all of them.
        for name in SERVERS:
            while not accepts(self.ports[name]):
                died = self._died()
                if died or time.monotonic() > deadline:
                    raise SwiftError(died or f"swift {name} server does not listen on {self.ports[name]}; see {self.log(name)}")
                time.sleep(0.05)
        client = self.client(max_attempts=1)
        while True:
            try:
                client.list_buckets()
                return
            except Exception as exc:
                died = self._died()
                if died or time.monotonic() > deadline:
                    raise SwiftError(died or f"the S3 endpoint does not answer: {exc!r}; see {self.logs}") from exc
                time.sleep(0.1)

    # S3 access

    def client(self, other: bool = False, secret_key: str | None = None, max_attempts: int | None = None) -> Any:
        """A boto3 S3 client for `test:tester` (or, with `other`, for `other:nobody`, who may do nothing).

        `secret_key` replaces the right one (to see a refusal); `max_attempts` limits botocore's retries
        (1: no retry, so a stopped proxy fails at once)."""
        config: dict[str, Any] = {"signature_version": "s3v4", "s3": {"addressing_style": "path"}}
        if max_attempts is not None:
            config["retries"] = {"max_attempts": max_attempts, "mode": "standard"}
            config["connect_timeout"] = 5
        access, secret = (self.other_access_key, self.other_secret_key) if other else (self.access_key, self.secret_key)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access,
            aws_secret_access_key=secret_key if secret_key is not None else secret,
            region_name=self.region,
            config=Config(**config),
        )

    def env(self, other: bool = False) -> dict[str, str]:
        """The AWS_* variables that give a subprocess's boto3 these credentials (the endpoint it must be told)."""
        access, secret = (self.other_access_key, self.other_secret_key) if other else (self.access_key, self.secret_key)
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": self.region}

    # The Swift API, for what S3 cannot say

    def _swift_request(self, method: str, container: str, headers: dict[str, str]) -> int:
        credentials = {"X-Auth-User": self.access_key, "X-Auth-Key": self.secret_key}
        auth = urllib.request.Request(f"{self.endpoint_url}/auth/v1.0", headers=credentials)
        with urllib.request.urlopen(auth, timeout=30) as answer:
            storage_url, token = answer.headers["X-Storage-Url"], answer.headers["X-Auth-Token"]
        url = f"{storage_url}/{urllib.parse.quote(container, safe='')}"
        request = urllib.request.Request(url, method=method, headers={"X-Auth-Token": token, **headers})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            raise SwiftError(f"{method} {container}: HTTP {exc.code} {exc.read()[:500]!r}") from exc

    def set_bucket_quota(self, bucket: str, max_bytes: int | None) -> None:
        """Make `bucket` refuse writes past `max_bytes` (None: no quota); the bucket must exist.

        Swift's container_quotas refuses an object PUT when the container's bytes plus the PUT's
        Content-Length pass X-Container-Meta-Quota-Bytes, an S3 413 EntityTooLarge. Multipart parts
        go to the bucket's segments container, so that one gets the same quota: an UploadPart then
        fails alike, and CompleteMultipartUpload (a small manifest) once the bucket is over it."""
        value = "" if max_bytes is None else str(max_bytes)  # an empty value removes the metadata
        self._swift_request("POST", bucket, {"X-Container-Meta-Quota-Bytes": value})
        # PUT: the segments container exists only after a first multipart upload; PUT creates or updates it.
        self._swift_request("PUT", bucket + SEGMENTS_SUFFIX, {"X-Container-Meta-Quota-Bytes": value})

    # Stopping

    def stop_proxy(self) -> None:
        """Kill the proxy (SIGKILL, like a crash) and wait for its exit: S3 calls then fail to connect."""
        process = self.processes.pop("proxy", None)
        if process is not None:
            _stop_process(process, kill=True)

    def start_proxy(self, timeout: float = 60) -> None:
        """Start the proxy again, on the same port, and wait until it answers."""
        if "proxy" in self.processes and self.processes["proxy"].poll() is None:
            return
        self._spawn("proxy")
        self._wait_ready(timeout)

    def stop(self) -> None:
        """Stop every server and wait for their exits; the files stay in `base`."""
        for name in reversed(SERVERS):
            process = self.processes.pop(name, None)
            if process is not None:
                _stop_process(process, kill=False)


def start_swift(base: Path, timeout: float = 60) -> SwiftServer:
    """A started SwiftServer with its files in `base`."""
    return SwiftServer(base).start(timeout)
