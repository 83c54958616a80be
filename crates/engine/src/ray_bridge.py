"""The Ray side of `pipeline run --executor ray`: one Ray task per shard of a map stage.

Carried inside the `pipeline` binary (crates/engine/src/shard.rs) and run with the project's
Python. Reads its orders as one JSON object on stdin:

    {"address": "127.0.0.1:6379" | null, "stage": "embed", "num_cpus": 1, "num_gpus": 0,
     "max_retries": 2, "env": {...}, "shards": [{"index": 0, "argv": ["pipeline", "worker", ...]}]}

and prints one JSON line per event on stdout: `connected` (nodes, CPUs, GPUs), `done` (a shard,
the node it ran on, its attempts), `failed` (a shard that failed on its last attempt; the rest
are cancelled). Exits 0 when every shard finished.

Each task runs `pipeline worker` as a subprocess in its own session. A subprocess that fails or
is killed makes the task raise, and Ray retries it (retry_exceptions); a Ray worker or node that
dies is retried by Ray as well. A retried shard replaces what the failed attempt staged.
"""

import json
import os
import signal
import socket
import subprocess
import sys


def emit(**event):
    print(json.dumps(event), flush=True)


def fail(error):
    emit(event="failed", shard=None, error=error)
    sys.exit(3)


def main():
    spec = json.load(sys.stdin)
    address = spec.get("address")
    host = (address or "127.0.0.1").rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        # On loopback Ray must say 127.0.0.1, not the machine's network address (and listen
        # there only); see shared/notes/ray.md.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as e:
        fail(f"the Ray Python package is not installed for {sys.executable} ({e}): scripts/setup.sh installs it "
             "into the project's venv, or set PIPELINE_PYTHON to a Python that has it")
    if address:
        # Ray itself waits minutes for a cluster that is not there; a missing one is said at once.
        h, _, p = address.rpartition(":")
        try:
            socket.create_connection((h.strip("[]"), int(p)), timeout=10).close()
        except (OSError, ValueError) as e:
            fail(f"no Ray cluster answers at {address} ({e}): start one (`ray start --head`) or give its GCS address, HOST:PORT")

    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # RAY_ADDRESS or a cluster `ray start` made on this machine, else a Ray for this run.
        ray.init(object_store_memory=100_000_000, **kwargs)
    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    emit(event="connected", nodes=len(alive), cpus=res.get("CPU", 0), gpus=res.get("GPU", 0))
    if spec["num_gpus"] > res.get("GPU", 0):
        # Ray would keep such a task pending for ever.
        fail(f"stage `{spec['stage']}` runs on CUDA and asks one GPU per shard, but the Ray cluster has {res.get('GPU', 0)}")

    @ray.remote
    def shard(index, argv, env):
        full = dict(os.environ)
        full.update(env)
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=full)
        try:
            out, err = p.communicate()
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        if p.returncode != 0:
            how = f"was killed by signal {-p.returncode}" if p.returncode < 0 else f"exited with {p.returncode}"
            tail = "\n".join(err.strip().splitlines()[-12:])
            raise RuntimeError(f"shard {index}: `pipeline worker` {how} on node {ray.get_runtime_context().get_node_id()[:12]}:\n{tail}")
        return {"shard": index, "node": ray.get_runtime_context().get_node_id()}

    options = dict(num_cpus=spec["num_cpus"], num_gpus=spec["num_gpus"],
                   max_retries=spec["max_retries"], retry_exceptions=True)
    refs = {}
    for s in spec["shards"]:
        refs[shard.options(name=f"{spec['stage']}-shard-{s['index']}", **options).remote(s["index"], s["argv"], spec["env"])] = s["index"]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                emit(event="done", **ray.get(ref))
            except Exception as e:  # the task's last attempt failed
                emit(event="failed", shard=refs[ref], error=str(e)[-4000:])
                for r in pending:
                    ray.cancel(r, force=True)
                sys.exit(3)
    ray.shutdown()


if __name__ == "__main__":
    main()
