"""`pocus`: one console script, subcommands created lazily by name.

Each entry names "module:function"; the function takes an argparse parser, adds its arguments and
returns the callable that runs the command. Only the chosen command's module is imported, so
`pocus app` works on an edge install without torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

Command = tuple[str, str]  # (one-line help, "module:configure")

COMMANDS: dict[str, Command | dict[str, Command]] = {
    "app": ("Open the bedside guidance app (or run it headless)", "edge_app.app_cli:configure_app"),
    "source": ("Open any source, read frames and print a summary", "devices.cli:configure_source"),
    "stream": ("Serve any source as an OpenIGTLink server (like a PLUS server)", "devices.cli:configure_stream"),
    "record": ("Record any source to a session folder", "devices.cli:configure_record"),
    "sim": {
        "gallery": ("Grid of simulated standard views with their ground truth", "devices.sim.cli:configure_gallery"),
        "bench": ("Simulator rendering speed at several output sizes", "devices.sim.cli:configure_bench"),
        "dataset": ("Pre-render a labelled simulator dataset to disk in shards", "training.cli:configure_dataset"),
    },
    "train": ("Train a guidance model (YAML config plus key=value overrides)", "training.cli:configure_train"),
    "grow": ("Grow a trained model into a wider, deeper one with the same outputs", "training.grow:configure_grow"),
    "val": ("Evaluate a model on held-out simulated patients or a dataset folder", "training.cli:configure_val"),
    "export": ("Export a checkpoint to a verified ONNX bundle (fp32/fp16/int8)", "export.cli:configure_export"),
    "bench": {
        "sources": ("Frames/s for decoding each source kind", "devices.cli:configure_bench_sources"),
        "sim": ("Simulator rendering speed (same as `pocus sim bench`)", "devices.sim.cli:configure_bench"),
        "model": ("Model formats/precisions/providers: accuracy, latency, FPS", "export.bench:configure_bench_model"),
        "e2e": ("Whole pipeline latency and throughput on the simulated probe", "edge_app.bench:configure_bench_e2e"),
        "train": ("Training throughput: model step (images/s) and simulator data rate", "training.bench:configure_bench_train"),
    },
    "eval": {
        "guidance": ("Closed loop: does a simulated novice reach a diagnostic view?", "edge_app.closed_loop:configure_eval"),
        "poses": ("Closed loop on training patients: save the poses guided novices visit (for training)",
                  "edge_app.closed_loop:configure_poses"),
        "check": ("Closed loop, one policy over many held-out seeds, paired against a run before",
                  "edge_app.loop_check:configure_check"),
    },
}


def _load(target: str) -> Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int | None]]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _usage(table: dict, prog: str) -> str:
    width = max(len(name) for name in table)
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)", "", "commands:"]
    for name, entry in table.items():
        if isinstance(entry, dict):
            lines.append(f"  {name:<{width}}  {' | '.join(entry)}  ({prog} {name} --help)")
        else:
            lines.append(f"  {name:<{width}}  {entry[0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table: dict = COMMANDS
    prog = "pocus"
    if not argv or argv[0] in ("-h", "--help"):
        print("POCUS Guide: point-of-care cardiac ultrasound guidance.\n")
        print(_usage(table, prog))
        return 0
    while True:
        name = argv.pop(0)
        entry = table.get(name)
        if entry is None:
            print(f"{prog}: unknown command '{name}'\n\n{_usage(table, prog)}", file=sys.stderr)
            return 2
        prog = f"{prog} {name}"
        if not isinstance(entry, dict):
            break
        table = entry
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(table, prog))
            return 0 if argv else 2
    help_text, target = entry
    parser = argparse.ArgumentParser(prog=prog, description=help_text)
    run = _load(target)(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing boundary: one clear line, no traceback
        from devices.base import SourceError
        if isinstance(e, (SourceError, FileNotFoundError, ValueError)):
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
