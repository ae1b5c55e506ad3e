"""`pocus source | stream | record | bench sources`: look at, serve and record any source.

Each `configure_*` adds its arguments to the parser and returns the function that runs the
command (see edge_app/cli.py). Source options go through `-o KEY=VALUE` (repeatable; values
parsed as YAML scalars, e.g. `-o loop=true -o realtime=false -o crop_sector=true`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from devices.base import EndOfStream, SourceError, create_source

SPEC_HELP = ("source spec: sim, video:0, video:clip.mp4, video:rtsp://..., dicom:loop.dcm, "
             "igtl://127.0.0.1:18944, rec:session_dir")


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """`["loop=true", "fps=30"]` -> {"loop": True, "fps": 30}.

    Raises:
        ValueError: an item without '='.
    """
    import yaml
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"source option '{pair}' must look like KEY=VALUE, e.g. -o loop=true")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def open_source(spec: str, option_pairs: list[str] | None):
    """Create and open a source; unknown option names become a SourceError that names them."""
    options = parse_options(option_pairs)
    try:
        source = create_source(spec, **options)
    except TypeError as e:
        raise SourceError(f"{spec}: bad source option ({e}); see the source's documentation") from e
    return source.open()


def _add_spec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help=SPEC_HELP)
    parser.add_argument("-o", "--opt", action="append", metavar="KEY=VALUE", default=[],
                        help="source option, repeatable: loop=true, realtime=false, crop_sector=true, "
                             "connect_timeout_s=10, device=Image ...")


def _progress(total: float | None, unit: str):
    """tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not sys.stderr.isatty(), leave=False)


# ------------------------------------------------------------------------------------ source
def configure_source(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """`pocus source SPEC [--frames N] [--json]`: open a source, read frames, summarize."""
    parser.description = ("Open any source, read N frames and print its name, frame rate, frame size, dtype and "
                          "the mean time per read (which includes the source's own pacing: add -o realtime=false "
                          "to measure decoding alone).")
    _add_spec(parser)
    parser.add_argument("--frames", type=int, default=30, help="frames to read (default 30)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each frame (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def run(args: argparse.Namespace) -> int:
        if args.frames < 1:
            raise ValueError("--frames must be at least 1")
        with open_source(args.spec, args.opt) as source:
            times, first, timeouts, ended = [], None, 0, False
            while len(times) < args.frames:
                t0 = time.perf_counter()
                try:
                    frame = source.read(timeout=args.timeout)
                except EndOfStream:
                    ended = True
                    break
                if frame is None:
                    timeouts += 1
                    if timeouts >= 3:
                        break
                    continue
                times.append(time.perf_counter() - t0)
                first = first or frame
            summary = {
                "source": source.name, "fps": round(float(source.fps), 3), "frames": len(times),
                "timeouts": timeouts, "end_of_stream": ended,
                "height": first.image.shape[0] if first else None, "width": first.image.shape[1] if first else None,
                "dtype": str(first.image.dtype) if first else None,
                "spacing_mm": list(first.spacing_mm) if first and first.spacing_mm else None,
                "has_pose": bool(first is not None and first.pose is not None),
                "read_ms_mean": round(1e3 * sum(times) / len(times), 3) if times else None,
                "read_ms_max": round(1e3 * max(times), 3) if times else None,
            }
        if args.json:
            print(json.dumps(summary))
        else:
            size = f"{summary['height']}x{summary['width']} (HxW) {summary['dtype']}" if first else "no frame"
            spacing = "x".join(f"{v:.3g}" for v in summary["spacing_mm"]) + " mm" if summary["spacing_mm"] else "unknown"
            read = (f"mean {summary['read_ms_mean']} ms, max {summary['read_ms_max']} ms" if times else "-")
            for key, value in (("source", summary["source"]), ("fps", summary["fps"]),
                               ("frames", f"{len(times)} read, {timeouts} timeouts" + (", end of stream" if ended else "")),
                               ("frame size", size), ("spacing", spacing), ("pose", "yes" if summary["has_pose"] else "no"),
                               ("read time", read)):
                print(f"{key:<11} {value}")
        return 0 if times else 1

    return run


# ------------------------------------------------------------------------------------ stream
def configure_stream(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """`pocus stream SPEC [--port] [--host] [--frames N] [--device-name]`: serve as OpenIGTLink."""
    parser.description = ("Serve any source as an OpenIGTLink server, like a PLUS server: every frame goes out as "
                          "an IMAGE message (plus a TRANSFORM when the frame has a probe pose). 3D Slicer's "
                          "OpenIGTLinkIF or `pocus source igtl://HOST:PORT` can connect. Stops after --frames, at "
                          "the end of a file (add -o loop=true to repeat) or on Ctrl-C.")
    _add_spec(parser)
    parser.add_argument("--port", type=int, default=18944, help="TCP port (default 18944; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 = every network)")
    parser.add_argument("--frames", type=int, default=0, help="stop after N frames (default: run until stopped)")
    parser.add_argument("--device-name", default="Image", help="IMAGE device name (default Image)")
    parser.add_argument("--pose-name", default="ProbeToReference", help="TRANSFORM device name")
    parser.add_argument("--wait-client", type=float, default=0.0,
                        help="wait up to this many seconds for a first client before streaming")

    def run(args: argparse.Namespace) -> int:
        from devices.igtl import IGTLinkServer
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {args.host}: other machines on the network can connect", file=sys.stderr)
        with open_source(args.spec, args.opt) as source, \
                IGTLinkServer(args.host, args.port, args.device_name, args.pose_name) as server:
            print(f"serving {source.name} on {args.host}:{server.port} as '{args.device_name}' (Ctrl-C stops)",
                  flush=True)
            deadline = time.monotonic() + args.wait_client
            while server.clients == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            sent, last_print, t_start = 0, time.monotonic(), time.monotonic()
            try:
                while not args.frames or sent < args.frames:
                    try:
                        frame = source.read(timeout=1.0)
                    except EndOfStream:
                        break
                    if frame is None:
                        continue
                    server.send(frame)
                    sent += 1
                    if time.monotonic() - last_print >= 2.0:
                        last_print = time.monotonic()
                        rate = sent / max(last_print - t_start, 1e-9)
                        print(f"sent {sent} frames ({rate:.1f}/s), {server.clients} client(s)", file=sys.stderr)
                time.sleep(0.2)  # let the last message leave before closing the sockets
            except KeyboardInterrupt:
                pass
            print(f"sent {sent} frames")
        return 0

    return run


# ------------------------------------------------------------------------------------ record
def configure_record(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """`pocus record SPEC --out DIR [--seconds S | --frames N]`: record to a session folder."""
    parser.description = ("Record any source to a session folder (session.json, frames.bin, frames.jsonl; crash-"
                          "safe to within a second). Replay it with `pocus source rec:DIR` or as the app's source. "
                          "Stops after --seconds / --frames, at the end of a file, or on Ctrl-C.")
    _add_spec(parser)
    parser.add_argument("--out", required=True, help="new session folder")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--seconds", type=float, default=0.0, help="record this long")
    limit.add_argument("--frames", type=int, default=0, help="record this many frames")

    def run(args: argparse.Namespace) -> int:
        from devices.recorder import SessionRecorder
        if args.seconds < 0 or args.frames < 0:
            raise ValueError("--seconds and --frames must not be negative")
        with open_source(args.spec, args.opt) as source:
            meta = {"spec": args.spec, "options": parse_options(args.opt)}
            try:
                rec = SessionRecorder(args.out, source_name=source.name, meta=meta, fps=source.fps)
            except FileExistsError as e:
                raise ValueError(str(e)) from e
            with rec:
                bar = _progress(args.frames or None, "frame")
                t_start = time.monotonic()
                try:
                    while not (args.frames and rec.frames >= args.frames):
                        if args.seconds and time.monotonic() - t_start >= args.seconds:
                            break
                        try:
                            frame = source.read(timeout=1.0)
                        except EndOfStream:
                            break
                        if frame is not None:
                            rec.append(frame)
                            bar.update(1)
                except KeyboardInterrupt:
                    pass
                elapsed = time.monotonic() - t_start
                bar.close()
            print(f"recorded {rec.frames} frames in {elapsed:.1f} s to {rec.folder}")
        return 0 if rec.frames else 1

    return run


# ------------------------------------------------------------------------------------ bench
def configure_bench_sources(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """`pocus bench sources [--json]`: decoding speed of each source kind on files it makes."""
    parser.description = ("Frames/s for decoding each source kind (video AVI/MP4, DICOM uncompressed/RLE/JPEG/"
                          "JPEG 2000, a recording, a screen capture with sector cropping, OpenIGTLink over "
                          "loopback) on files it writes to a temporary folder. Sources run unpaced "
                          "(realtime=false), one pass each.")
    parser.add_argument("--frames", type=int, default=30, help="frames per file (default 30)")
    parser.add_argument("--size", default="480x640", help="frame size HxW (default 480x640, a typical US export)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", default="", help="also save the JSON results to this file")

    def run(args: argparse.Namespace) -> int:
        from devices.bench import format_table, run_source_bench
        try:
            h, w = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size must look like 480x640, got {args.size!r}") from None
        if args.frames < 2 or h < 16 or w < 16:
            raise ValueError("--frames must be >= 2 and --size at least 16x16")
        results = run_source_bench(n_frames=args.frames, height=h, width=w, progress=not args.json)
        text = json.dumps(results, indent=2)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        print(text if args.json else format_table(results))
        return 0

    return run
