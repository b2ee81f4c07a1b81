"""Start and stop a local multi-node Ray cluster on one machine, for tests and demos.

``start`` runs ``ray start --head`` (bound to 127.0.0.1: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)
and N-1 ``ray start --address=...`` worker nodes, all sharing one temp dir of their own; node
``i`` carries the custom resource ``{"local_node_<i>": 1}`` so work can be pinned to it.
``ray start --address`` refuses to run with that variable at 0, so worker nodes run with 1:
they reach the head through a host name for 127.0.0.1 (:func:`loopback_alias`) and register
under the machine's IP. Token auth is on by default, with a token made for this cluster and
passed as ``RAY_AUTH_TOKEN`` (never written to ``~/.ray``); every node and client uses the
same ``RAY_AUTH_MODE``. A JSON state file (mode 0600) records the addresses, the dashboard URL,
the environment a driver or the ``ray`` CLI needs, and every Ray process with its start time.
``stop`` signals exactly those processes and their descendants (Ray workers started later):
raylets first, then the rest, gcs_server last, SIGKILL after a grace period. It never runs
``ray stop``, which kills every Ray process on the machine.

    python cluster/local_cluster.py start --nodes 2 --cpus-per-node 1 --temp-dir /tmp/lc
    python cluster/local_cluster.py status --state /tmp/lc/local_cluster.json
    eval "$(python cluster/local_cluster.py env --state /tmp/lc/local_cluster.json)"
    python cluster/local_cluster.py stop --state /tmp/lc/local_cluster.json

From Python (tests): ``handle = start_cluster(nodes=2)``, ``stop_cluster(handle)``.

With ``--private-disks`` (root only: it uses ``unshare --mount``), every node runs in its own
mount namespace with fresh tmpfs over ``/tmp``, ``$HOME`` and ``/dev/shm``: like separate
machines, nodes share nothing but the loopback network (and whatever object storage it
reaches). The project checkout and the Python installation are bound back read-only, so the
nodes run the same code; everything a node writes stays on its own disks (visible from outside
only through ``/proc/<pid>/root``, see :func:`node_root`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("local_cluster")

STATE_NAME = "local_cluster.json"
RAY_BINARIES = ("raylet", "gcs_server")
LITERAL_LOOPBACK = ("localhost", "127.0.0.1", "::1")
V4_MAPPED_LOOPBACK = "[::ffff:127.0.0.1]"
AUTH_MODES = ("token", "disabled")
RESOURCE_PREFIX = "local_node_"
MAX_TEMP_DIR_LEN = 54  # Ray's sockets live below it (worker nodes add /nodeN); paths max 107 bytes
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0


@dataclass
class Proc:
    """One Ray process: its PID, its start time (guards against PID reuse) and its name."""

    pid: int
    start: int
    name: str
    node: int | None = None


@dataclass
class ClusterHandle:
    """What ``start`` recorded; saved as JSON in ``state_file``."""

    temp_dir: str
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    resources: list[str]
    processes: list[Proc] = field(default_factory=list)
    state_file: str = ""
    private_disks: bool = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def save(self) -> str:
        """Write the state file (readable by the owner only: it holds the auth token)."""
        fd = os.open(self.state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
        return self.state_file

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClusterHandle:
        data = json.loads(Path(path).read_text())
        data["processes"] = [Proc(**p) for p in data.get("processes", [])]
        return cls(**data)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_exe() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise RuntimeError(f"no `ray` executable next to {sys.executable} or on PATH; "
                           "install ray[default]")
    return found


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, start time in clock ticks) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return comm, rest[0], int(rest[19])


def _alive(proc: Proc) -> bool:
    """True while the process runs; a zombie or a reused PID counts as gone."""
    info = _stat(proc.pid)
    return info is not None and info[1] not in ("Z", "X") and info[2] == proc.start


@functools.lru_cache(maxsize=1)
def _ray_package_dir() -> str:
    """The installed ``ray`` package's folder, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return os.sep + "ray" + os.sep
    return os.path.join(list(spec.submodule_search_locations)[0], "")


def _is_ray_process(args: list[str], comm: str) -> bool:
    """Ray's binaries, or Python running a script from the ray package (dashboard, monitors)."""
    if comm in RAY_BINARIES or (args and os.path.basename(args[0]) in RAY_BINARIES):
        return True
    if args[1:2] == ["-m"] and len(args) > 2 and args[2].startswith("ray."):
        return True  # e.g. the Ray client server
    package = _ray_package_dir()
    return any(a.startswith(package) for a in args[1:3])


def _user_processes() -> dict[int, tuple[list[str], int]]:
    """Our user's processes: pid -> (command line, parent pid)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            args = [a.decode(errors="replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE).group(1))
        out[int(entry.name)] = (args, ppid)
    return out


def find_processes(temp_dir: str, gcs_address: str | None = None) -> list[Proc]:
    """Our user's live Ray processes whose command line names ``temp_dir`` or the GCS."""
    names = [re.escape(temp_dir.rstrip("/")) + r"(?:/|$|[,\s])"]
    if gcs_address:
        names.append(re.escape(gcs_address) + r"(?!\d)")
    pattern = re.compile(r"(?:^|[=:,\s/])(?:" + "|".join(names) + ")")
    found = []
    for pid, (args, _) in _user_processes().items():
        info = _stat(pid)
        if info is None or info[1] in ("Z", "X") or not _is_ray_process(args, info[0]):
            continue
        if any(pattern.search(a) for a in args):
            found.append(Proc(pid, info[2], info[0]))
    return found


def _descendants(roots: list[Proc]) -> list[Proc]:
    """Live descendants of ``roots`` (Ray workers rename themselves, so the tree finds them)."""
    table = _user_processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo, seen = [], [p.pid for p in roots], {p.pid for p in roots}
    while todo:
        for child in children.get(todo.pop(), []):
            info = _stat(child)
            if child in seen or info is None or info[1] in ("Z", "X"):
                continue
            seen.add(child)
            out.append(Proc(child, info[2], info[0]))
            todo.append(child)
    return out


def _resolves_to_loopback(name: str) -> bool:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET)
    except OSError:
        return False
    return any(info[4][0] == "127.0.0.1" for info in infos)


def loopback_alias(preferred: str | None = None) -> str:
    """How worker nodes spell the head's host: 127.0.0.1, but not as ``localhost``/``127.0.0.1``.

    Worker nodes must run with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` (``ray start
    --address`` refuses 0), and then Ray rewrites a literal loopback address to the machine's
    external IP, where the head (bound to 127.0.0.1) does not listen. A host name that
    resolves to 127.0.0.1 is left alone; failing one, the IPv4-mapped IPv6 form is used.
    """
    if preferred:
        if preferred in LITERAL_LOOPBACK:
            raise ValueError(f"host_alias={preferred!r}: Ray rewrites this name; expected "
                             "another name for 127.0.0.1")
        return preferred
    for name in (socket.gethostname(), socket.getfqdn(), "localhost.localdomain", "localhost4"):
        if name and name not in LITERAL_LOOPBACK and _resolves_to_loopback(name):
            return name
    return V4_MAPPED_LOOPBACK


def _cluster_env(auth: str, token: str | None) -> dict[str, str]:
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": auth,
           "RAY_USAGE_STATS_ENABLED": "0",
           # Serve's proxy refuses chunked bodies (as pipelines.common.ray_init.COMMON_ENV)
           "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pipelines.serve.proxy_guard:middlewares"}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


def _node_args(index: int, cpus: int, object_store_mb: int) -> list[str]:
    """Per-node flags: resources and explicit free ports (several raylets share one host)."""
    args = [f"--num-cpus={cpus}", "--num-gpus=0",
            f"--resources={json.dumps({f'{RESOURCE_PREFIX}{index}': 1})}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"):
        args.append(f"--{flag}={free_port()}")
    return args


def _run_ray_start(cmd: list[str], env: dict[str, str], log_file: Path) -> None:
    with open(log_file, "ab") as out:
        result = subprocess.run(cmd, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S, check=False)
    if result.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited with {result.returncode}; "
                           f"log {log_file}:\n{tail}")


def _api_nodes(handle: ClusterHandle) -> list[dict]:
    """The cluster's nodes from the dashboard's state API."""
    request = urllib.request.Request(f"{handle.dashboard_url}/api/v0/nodes?detail=true&limit=1000")
    token = handle.env.get("RAY_AUTH_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    return body["data"]["result"]["result"]


def list_nodes(handle: ClusterHandle) -> list[dict]:
    """One dict per node: id, state, whether head, its ``local_node_<i>`` resource, CPUs."""
    out = []
    for node in _api_nodes(handle):
        total = node.get("resources_total", {})
        mine = [r for r in total if r.startswith(RESOURCE_PREFIX)]
        out.append({"node_id": node.get("node_id"), "state": node.get("state"),
                    "is_head": bool(node.get("is_head_node")), "resource": mine[0] if mine
                    else None, "cpus": total.get("CPU", 0)})
    return sorted(out, key=lambda n: n["resource"] or "")


def _wait_for_nodes(handle: ClusterHandle, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            alive = [n for n in list_nodes(handle) if n["state"] == "ALIVE"]
            if len(alive) >= count:
                return
            last = f"{len(alive)} of {count} nodes alive"
        except (OSError, KeyError, ValueError) as exc:
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"the cluster in {handle.temp_dir} did not reach {count} alive nodes "
                       f"within {timeout_s:.0f} s (last: {last})")


PROJECT = Path(__file__).resolve().parents[1]


def _bind_back(hide: list[str]) -> list[str]:
    """Folders a private node must still read (the code, the interpreter) that live below a
    folder its namespace hides."""
    python = Path(os.path.realpath(sys.executable)).parents[1]  # e.g. ~/.pyenv/versions/3.11
    venv = Path(sys.prefix)
    wanted = {str(p) for p in (PROJECT, python, venv)}
    return sorted(d for d in wanted if any(d == h or d.startswith(h + "/") for h in hide))


def private_node_command(cmd: list[str], hide: list[str] | None = None) -> list[str]:
    """``cmd`` run in a new mount namespace whose ``hide`` folders (default ``/tmp``, ``$HOME``,
    ``/dev/shm``) are fresh, private tmpfs, with the project and the interpreter bound back
    read-only (PLATFORM.md: a Ray node with its own disks on one machine)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        raise RuntimeError("private disks need root and unshare(1) (mount namespaces)")
    hide = hide or ["/tmp", os.path.expanduser("~"), "/dev/shm"]
    keep = _bind_back(hide)
    q = shlex.quote
    lines = ["set -eu", "mkdir -p /srv", "stage=$(mktemp -d /srv/.mova-node.XXXXXX)",
             'mount -t tmpfs tmpfs "$stage"']
    lines += [f'mkdir "$stage/{i}" && mount --bind {q(d)} "$stage/{i}"'
              for i, d in enumerate(keep)]
    lines += [f"mount -t tmpfs tmpfs {q(h)}" for h in hide]
    lines += [f'mkdir -p {q(d)} && mount --move "$stage/{i}" {q(d)} && '
              f"mount -o remount,bind,ro {q(d)}" for i, d in enumerate(keep)]
    lines += ['umount "$stage" && rmdir "$stage"', "cd /tmp",
              "exec " + " ".join(q(c) for c in cmd)]
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(lines)]


def node_root(handle: ClusterHandle, index: int) -> Path:
    """Where this process sees node ``index``'s private disks (``/proc/<raylet>/root``), or
    ``/`` for a node without them."""
    raylet = next((p for p in handle.processes if p.node == index and p.name == "raylet"
                   and _alive(p)), None)
    return Path(f"/proc/{raylet.pid}/root") if raylet and handle.private_disks else Path("/")


def _checked_temp_dir(nodes: int, cpus_per_node: int, auth: str, temp_dir: str | None,
                      port: int | None, node_env: list[dict[str, str]] | None) -> str:
    """The cluster's temp dir (created), after checking the arguments and that no Ray runs
    there yet."""
    if node_env is not None and len(node_env) != nodes:
        raise ValueError(f"node_env has {len(node_env)} entries for {nodes} node(s)")
    if nodes < 1 or cpus_per_node < 0:
        raise ValueError(f"nodes={nodes}, cpus_per_node={cpus_per_node}; expected nodes >= 1 "
                         "and cpus_per_node >= 0")
    if auth not in AUTH_MODES:
        raise ValueError(f"auth={auth!r}; expected one of {AUTH_MODES}")
    temp_dir = os.path.abspath(temp_dir or tempfile.mkdtemp(prefix="mova-lc-", dir="/tmp"))
    if len(temp_dir) > MAX_TEMP_DIR_LEN:
        raise ValueError(f"temp_dir {temp_dir!r} is {len(temp_dir)} characters; Ray's socket "
                         f"paths need at most {MAX_TEMP_DIR_LEN} (use a short path in /tmp)")
    os.makedirs(temp_dir, exist_ok=True)
    if find_processes(temp_dir, f"127.0.0.1:{port}" if port else None):
        raise RuntimeError(f"Ray processes already run with temp dir {temp_dir}; stop them "
                           "first or pick another temp dir")
    return temp_dir


def _node_command(ray: str, index: int, port: int, dashboard_port: int, alias: str | None,
                  temp_dir: str, node_args: list[str]) -> list[str]:
    """``ray start`` of node ``index``: the head (0) or a worker joining it."""
    if index == 0:
        cmd = [ray, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
               f"--ray-client-server-port={free_port()}"]
    else:  # a worker node: Ray refuses to join one when this variable is 0
        cmd = [ray, "start", f"--address={alias}:{port}"]
    # each worker node its own temp dir (below the cluster's): its own session folder, logs and
    # runtime_resources, as separate machines would have; nodes sharing one race when they
    # unpack the same job package into it
    node_dir = temp_dir if index == 0 else os.path.join(temp_dir, f"node{index}")
    return cmd + [f"--temp-dir={node_dir}", "--disable-usage-stats", *node_args]


def start_cluster(
    nodes: int = 2,
    cpus_per_node: int = 1,
    temp_dir: str | None = None,
    *,
    port: int | None = None,
    dashboard_port: int | None = None,
    auth: str = "token",
    object_store_mb: int = 200,
    state_file: str | None = None,
    timeout_s: float = START_TIMEOUT_S,
    host_alias: str | None = None,
    node_env: list[dict[str, str]] | None = None,
    private_disks: bool = False,
) -> ClusterHandle:
    """Start a head and ``nodes - 1`` worker nodes on this machine; returns the handle.

    ``node_env[i]`` adds environment variables to node ``i`` (its raylet and every worker it
    starts inherit them), e.g. a private ``TMPDIR``/``HOME``/``MOVA_CACHE`` per node so that
    nodes share no folder; ``private_disks`` puts every node in its own mount namespace
    (:func:`private_node_command`). Everything the cluster starts is stopped again if any step
    fails.
    """
    temp_dir = _checked_temp_dir(nodes, cpus_per_node, auth, temp_dir, port, node_env)
    port, dashboard_port = port or free_port(), dashboard_port or free_port()
    token = secrets.token_hex(32) if auth == "token" else None
    env = _cluster_env(auth, token)
    gcs = f"127.0.0.1:{port}"
    handle = ClusterHandle(
        temp_dir=temp_dir, gcs_address=gcs, dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env={**env, "RAY_ADDRESS": gcs, "RAY_API_SERVER_ADDRESS":
             f"http://127.0.0.1:{dashboard_port}"},
        resources=[f"{RESOURCE_PREFIX}{i}" for i in range(nodes)],
        state_file=state_file or os.path.join(temp_dir, STATE_NAME),
        private_disks=private_disks,
    )
    ray = _ray_exe()
    alias = loopback_alias(host_alias) if nodes > 1 else None
    logs = Path(temp_dir) / "local_cluster_logs"
    logs.mkdir(exist_ok=True)
    try:
        for index in range(nodes):
            cmd = _node_command(ray, index, port, dashboard_port, alias, temp_dir,
                                _node_args(index, cpus_per_node, object_store_mb))
            log.info("starting node %d: %s", index, " ".join(cmd[1:3]))
            if private_disks:
                cmd = private_node_command(cmd)
            start_env = env if index == 0 else {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
            if node_env is not None:
                start_env = {**node_env[index], **start_env}
            _run_ray_start(cmd, start_env, logs / f"node_{index}.log")
            known = {p.pid for p in handle.processes}
            found = find_processes(temp_dir, gcs)
            handle.processes += [Proc(p.pid, p.start, p.name, index)
                                 for p in found + _descendants(found) if p.pid not in known]
            handle.save()
        _wait_for_nodes(handle, nodes, timeout_s)
    except BaseException:
        log.error("start failed; stopping what was started in %s", temp_dir)
        stop_cluster(handle)
        raise
    handle.save()
    log.info("local Ray cluster up: %d node(s), GCS %s, dashboard %s, state %s", nodes, gcs,
             handle.dashboard_url, handle.state_file)
    return handle


def _stage(proc: Proc) -> int:
    return {"raylet": 0, "gcs_server": 2}.get(proc.name, 1)


def _wait_gone(procs: list[Proc], timeout_s: float) -> list[Proc]:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _signal(procs: list[Proc], sig: signal.Signals) -> None:
    for proc in procs:
        if _alive(proc):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass


def stop_cluster(handle: ClusterHandle, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Stop the cluster's processes by PID; returns the PIDs that had to be SIGKILLed.

    Recorded processes are only signalled while their start time still matches (a reused
    PID is left alone); processes started later are found as their descendants, or as Ray
    processes whose command line names this cluster's temp dir or GCS address.
    """
    deadline = time.monotonic() + grace_s
    killed: list[int] = []
    for _ in range(3):  # a second pass catches workers spawned while stopping
        recorded = {p.pid: p for p in handle.processes if _alive(p)}
        for proc in find_processes(handle.temp_dir, handle.gcs_address):
            recorded.setdefault(proc.pid, proc)
        for proc in _descendants(list(recorded.values())):
            recorded.setdefault(proc.pid, proc)
        targets = list(recorded.values())
        if not targets:
            break
        for stage in (0, 1, 2):
            group = [p for p in targets if _stage(p) == stage]
            _signal(group, signal.SIGTERM)
            _wait_gone(group, min(5.0, max(0.0, deadline - time.monotonic())))
        survivors = _wait_gone(targets, max(0.0, deadline - time.monotonic()))
        if survivors:
            log.warning("SIGKILL after %.0f s: %s", grace_s,
                        ", ".join(f"{p.name}({p.pid})" for p in survivors))
            _signal(survivors, signal.SIGKILL)
            killed += [p.pid for p in survivors]
            _wait_gone(survivors, 5.0)
    log.info("stopped the local Ray cluster in %s", handle.temp_dir)
    return killed


def _print_env(handle: ClusterHandle) -> None:
    for key, value in handle.env.items():
        print(f"export {key}={shlex.quote(value)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a head and N-1 worker nodes")
    start.add_argument("--nodes", type=int, default=2)
    start.add_argument("--cpus-per-node", type=int, default=1)
    start.add_argument("--temp-dir", help="short folder for Ray's files (default: a new one)")
    start.add_argument("--port", type=int, help="GCS port (default: a free one)")
    start.add_argument("--dashboard-port", type=int, help="dashboard port (default: free)")
    start.add_argument("--auth", choices=AUTH_MODES, default="token")
    start.add_argument("--object-store-mb", type=int, default=200)
    start.add_argument("--state", help=f"state file (default: <temp dir>/{STATE_NAME})")
    start.add_argument("--host-alias", help="a name for 127.0.0.1 that worker nodes use to "
                                            "reach the head (default: from /etc/hosts, else "
                                            f"{V4_MAPPED_LOOPBACK})")
    start.add_argument("--private-disks", action="store_true",
                       help="each node in its own mount namespace with private /tmp, $HOME and "
                            "/dev/shm, like separate machines (root; unshare --mount)")
    for name, text in (("stop", "stop"), ("status", "list the nodes of"),
                       ("env", "print `export` lines (with the token) to join")):
        p = sub.add_parser(name, help=f"{text} the cluster recorded in a state file")
        p.add_argument("--state", required=True, help="the state file `start` wrote")
    sub.choices["stop"].add_argument("--grace", type=float, default=STOP_GRACE_S,
                                     help="seconds before SIGKILL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "start":
        handle = start_cluster(args.nodes, args.cpus_per_node, args.temp_dir, port=args.port,
                               dashboard_port=args.dashboard_port, auth=args.auth,
                               object_store_mb=args.object_store_mb, state_file=args.state,
                               host_alias=args.host_alias, private_disks=args.private_disks)
        print(f"state: {handle.state_file}\ndashboard: {handle.dashboard_url}\n"
              f"join it from a shell: eval \"$(cluster/local-cluster.sh env --state "
              f"{handle.state_file})\"")
    elif args.command == "env":
        _print_env(ClusterHandle.load(args.state))
    elif args.command == "stop":
        handle = ClusterHandle.load(args.state)
        killed = stop_cluster(handle, grace_s=args.grace)
        print(f"stopped {len(handle.processes)} recorded process(es)"
              + (f"; SIGKILLed {killed}" if killed else ""))
    else:
        handle = ClusterHandle.load(args.state)
        for node in list_nodes(handle):
            print(f"{node['resource'] or '-':14} {node['state']:6} cpus={node['cpus']:<4} "
                  f"{'head' if node['is_head'] else 'worker':6} {node['node_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
