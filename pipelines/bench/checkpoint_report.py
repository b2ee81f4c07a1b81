"""The markdown section of `mova bench checkpoint` (also what the CLI prints)."""

from __future__ import annotations

from pipelines.bench.checkpoint import EXPERT, CheckpointBenchResult
from pipelines.bench.harness import markdown_table
from pipelines.bench.real import goal_verdict

MEMORY_GOAL_MIB = 256


def goals(r: CheckpointBenchResult) -> dict[str, float]:
    llm = [f for f in r.fetches if f.parts == "llm"]
    return {"peak_above_rest_mib": max(f.peak_mib - f.rest_mib for f in llm),
            "node_bytes_ratio": r.node_bytes / r.needed_bytes,
            "throughput_vs_boto3": r.boto3_s / r.fetch_s}


def render_markdown(r: CheckpointBenchResult) -> str:
    g = goals(r)
    rows = [[f.parts, f"{f.rest_mib:.0f}", f"{f.peak_mib:.0f}", f"{f.peak_mib - f.rest_mib:+.0f}",
             f.files, f"{f.bytes / 2**20:.1f}", f"{f.seconds:.1f}", ", ".join(f.weights)]
            for f in r.fetches]
    table = markdown_table(["process asks for", "resting MiB", "peak MiB", "peak - rest",
                            "files fetched", "MiB fetched", "seconds", "weight files it holds"],
                           rows)
    expert = next(f for f in r.fetches if f.parts.startswith("expert"))
    only_expert = all(w.startswith(f"experts/{EXPERT}/") for w in expert.weights)
    size = r.size_mib / 1024
    mem_goal = g["peak_above_rest_mib"] <= MEMORY_GOAL_MIB
    lines = [
        f"- Peak memory while fetching, above the process's resting size: at most "
        f"**{g['peak_above_rest_mib']:+.0f} MiB** (goal: at most +{MEMORY_GOAL_MIB} MiB: "
        f"{'met' if mem_goal else '**not met**'}), for a {size:.1f} GiB file.",
        f"- Bytes read from S3 by the node's {r.processes} processes together: "
        f"**{g['node_bytes_ratio']:.2f}x** what the node's replicas need (goal: 1.0x): one "
        "process fetched, the others waited on the node's lock and reused its copy.",
        f"- Fetch throughput: **{g['throughput_vs_boto3']:.2f}x** a plain boto3 "
        f"`download_file` of the same object ({r.boto3_s:.1f} s vs {r.fetch_s:.1f} s, SHA-256 "
        "checked while streaming; both with the same number of parallel ranged reads, boto3 "
        "with its default 8 MiB parts, ours 32 MiB: moto copies the whole object for every "
        "GET, so here fewer, larger reads win by more than they would on S3). "
        f"{goal_verdict(g['throughput_vs_boto3'], 0.8, 'throughput vs boto3')}",
        f"- The expert replica's process holds only its expert's weights: "
        f"**{'yes' if only_expert else 'no'}** ({', '.join(expert.weights) or 'none'}).",
        f"- Publishing the checkpoint (streamed multipart upload, digests checked): "
        f"{r.publish_s:.1f} s, peak {r.publish_peak_mib:+.0f} MiB above rest."]
    return ("## `mova bench checkpoint`: a checkpoint with one "
            f"{size:.1f} GiB shard fetched from S3 by {r.processes} processes of one node\n\n"
            f"Reproduce: `mova bench checkpoint --size-mib {r.size_mib} --processes "
            f"{r.processes}`\n\n"
            "S3 is a moto server on loopback (it holds an object whole in memory for every "
            "GET it serves, so its own memory and speed are not S3's). The node's processes "
            "start their fetch of the LLM part at the same moment, as the LLM replicas of a "
            "node do; one more process, on another node's cache, asks for one expert, as an "
            "expert replica does. Memory is each process's resident set, sampled every 10 ms "
            "(resting: after imports, before the fetch).\n\n"
            f"{table}\n\n" + "\n".join(lines) + "\n\nMachine: "
            + ", ".join(f"{k} {v}" for k, v in r.machine.items()) + "\n")
