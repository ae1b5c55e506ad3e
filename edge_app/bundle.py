"""Load a verified model bundle and the device profile that says how to run it.

A bundle is a folder written by `pocus export`:

    bundle.json          schema_version, files {name: {sha256, size_bytes, precision}}, manifest
    model.onnx           fp32; each ONNX file carries its manifest in metadata_props["pocus_manifest"]
    model.int8.onnx      optional (static QDQ int8, CPU)
    model.fp16.onnx      optional (GPU targets)

`load_bundle` refuses a bundle whose schema, hash, size, manifest, input or outputs do not match,
raising `BundleError` with the file and the reason. Only onnxruntime, json and hashlib here: no
torch, no onnx (the edge install has neither).

Manifest fields the runtime uses (see export/README.md for the whole list):
    input.shape [batch, 1, H, W], input.normalization {mean, std} (devices.preprocess),
    labels.views / targets / actions / pose_axes, outputs [{name, shape}],
    thresholds.quality_diagnostic        quality >= this is a diagnostic image
    thresholds.confidence_min            max softmax(view_logits) below this: "model unsure"
    thresholds.ood_energy_max            energy = -logsumexp(view_logits) above this: out of distribution
    (both calibrated at the 1st percentile of held-out in-distribution frames; `view_scores` computes them;
    the engine records ood_energy_max but gates on it only when asked: see EngineConfig.max_ood_energy)
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SCHEMA_VERSION = 1
MANIFEST_KEY = "pocus_manifest"
BUNDLE_JSON = "bundle.json"
PRECISIONS = ("fp32", "fp16", "int8")
FILE_FOR_PRECISION = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# Keys that differ between the files of one bundle; the rest of each embedded manifest equals bundle.json's.
PER_FILE_KEYS = ("precision", "file", "precision_check")
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "bundles" / "default"

# Execution providers onnxruntime knows by name (any build); the ones missing from this build are skipped.
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
    "DmlExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider", "QNNExecutionProvider",
    "NnapiExecutionProvider", "XnnpackExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider",
    "WebGpuExecutionProvider", "VitisAIExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider",
    "CPUExecutionProvider",
)
# Providers on which an fp16 graph makes sense (on the CPU provider fp16 is slow or unsupported).
GPU_PROVIDERS = frozenset({
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
    "DmlExecutionProvider", "CoreMLExecutionProvider", "WebGpuExecutionProvider",
})
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_PROFILE_KEYS = {"name", "description", "precision", "providers", "session"}
_SESSION_KEYS = {"intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "execution_mode"}


class BundleError(ValueError):
    """A bundle or profile is missing, tampered, truncated or does not match this runtime."""

    user_facing = True


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """How to run a bundle on one kind of device (parsed from export/profiles/<name>.yaml).

    Attributes:
        name: profile name.
        precision: preferred precisions, best first; the first one the bundle has (and the providers
            can run) is used.
        providers: (provider name, options) in priority order, as written in the file.
        intra_op_num_threads: threads inside one operator (0 = onnxruntime decides).
        inter_op_num_threads: threads across operators (0 = onnxruntime decides).
        graph_optimization_level: disable | basic | extended | all.
        execution_mode: sequential | parallel.
        description: one line for humans.
        path: the YAML file it came from.
    """

    name: str
    precision: tuple[str, ...] = ("fp32",)
    providers: tuple[tuple[str, dict], ...] = (("CPUExecutionProvider", {}),)
    intra_op_num_threads: int = 1
    inter_op_num_threads: int = 1
    graph_optimization_level: str = "all"
    execution_mode: str = "sequential"
    description: str = ""
    path: Path | None = None

    def available_providers(self) -> list[tuple[str, dict]]:
        """Providers of this profile that this onnxruntime build has, CPU always last.

        Missing ones are skipped with a warning (e.g. TensorRT on a CPU-only install).
        """
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        chosen: list[tuple[str, dict]] = []
        for name, options in self.providers:
            if name not in have:
                warnings.warn(f"profile '{self.name}': {name} is not available in this onnxruntime build "
                              f"({ort.__version__}: {', '.join(sorted(have))}); skipping it", stacklevel=2)
                continue
            chosen.append((name, _expand_options(options)))
        if not any(name == "CPUExecutionProvider" for name, _ in chosen):
            chosen.append(("CPUExecutionProvider", {}))
        return chosen


def _expand_options(options: Mapping[str, Any]) -> dict:
    """Provider options as onnxruntime wants them: paths with ~ expanded (and created), values as given."""
    out = {}
    for key, value in options.items():
        if isinstance(value, str) and key.endswith("_path"):
            value = os.path.expanduser(value)
            Path(value).mkdir(parents=True, exist_ok=True)
        out[key] = value
    return out


def profile_names() -> list[str]:
    """Names of the profiles shipped in export/profiles/."""
    return sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".yaml"))


def _profiles_dir():
    return resources.files("export") / "profiles"


def load_profile(name_or_path: str | os.PathLike | Profile = "cpu") -> Profile:
    """Read and validate a device profile.

    Args:
        name_or_path: a shipped profile name (`cpu`, `jetson-orin`, `desktop-cuda`), a path to a YAML
            file, or a Profile (returned as is).

    Returns:
        The validated Profile.

    Raises:
        BundleError: unknown profile, unreadable YAML, unknown keys, unknown provider names (the
            message lists the known ones), bad precision or thread values.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    import yaml

    text_path = str(name_or_path)
    if text_path.endswith((".yaml", ".yml")) or os.sep in text_path:
        path = Path(text_path)
        if not path.is_file():
            raise BundleError(f"profile file {path} does not exist")
        text = path.read_text()
    else:
        entry = _profiles_dir() / f"{text_path}.yaml"
        if not entry.is_file():
            raise BundleError(f"unknown profile '{text_path}': choose one of {', '.join(profile_names())} "
                              "or give a path to a .yaml file")
        path = Path(str(entry))
        text = entry.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BundleError(f"profile {path}: not valid YAML ({e})") from e
    return parse_profile(data, path=path)


def parse_profile(data: Any, path: Path | None = None) -> Profile:
    """Validate a profile mapping (the parsed YAML) and build a Profile.

    Raises:
        BundleError: see `load_profile`.
    """
    where = f"profile {path}" if path else "profile"
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected a mapping with keys {', '.join(sorted(_PROFILE_KEYS))}")
    unknown = set(data) - _PROFILE_KEYS
    if unknown:
        raise BundleError(f"{where}: unknown keys {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(_PROFILE_KEYS))})")
    name = str(data.get("name") or (path.stem if path else "profile"))

    precision = data.get("precision", ["fp32"])
    precision = [precision] if isinstance(precision, str) else precision
    if not isinstance(precision, list) or not precision or any(p not in PRECISIONS for p in precision):
        raise BundleError(f"{where}: precision must be a list drawn from {', '.join(PRECISIONS)}, got {precision!r}")

    providers = []
    for item in data.get("providers") or ["CPUExecutionProvider"]:
        pname, options = (item, {}) if isinstance(item, str) else (None, None)
        if isinstance(item, dict):
            pname, options = item.get("name"), item.get("options") or {}
            extra = set(item) - {"name", "options"}
            if extra:
                raise BundleError(f"{where}: provider entry has unknown keys {', '.join(sorted(extra))} "
                                  "(use name and options)")
        if pname not in KNOWN_PROVIDERS:
            raise BundleError(f"{where}: unknown execution provider {pname!r}; known providers: "
                              f"{', '.join(KNOWN_PROVIDERS)}")
        if not isinstance(options, dict):
            raise BundleError(f"{where}: options of {pname} must be a mapping, got {options!r}")
        providers.append((pname, dict(options)))

    session = data.get("session") or {}
    if not isinstance(session, dict) or set(session) - _SESSION_KEYS:
        bad = sorted(set(session) - _SESSION_KEYS) if isinstance(session, dict) else session
        raise BundleError(f"{where}: session has unknown keys {bad} (known: {', '.join(sorted(_SESSION_KEYS))})")
    threads = {}
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        value = session.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BundleError(f"{where}: session.{key} must be an integer >= 0 (0 = onnxruntime decides), got {value!r}")
        threads[key] = value
    level = str(session.get("graph_optimization_level", "all"))
    if level not in _OPT_LEVELS:
        raise BundleError(f"{where}: graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, got {level!r}")
    mode = str(session.get("execution_mode", "sequential"))
    if mode not in ("sequential", "parallel"):
        raise BundleError(f"{where}: execution_mode must be sequential or parallel, got {mode!r}")
    return Profile(name=name, precision=tuple(precision), providers=tuple(providers),
                   graph_optimization_level=level, execution_mode=mode,
                   description=str(data.get("description", "")), path=path, **threads)


# ----------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_bundle_json(bundle_dir: str | os.PathLike) -> dict:
    """Parse and check `bundle.json` (schema version, files table, manifest), without touching the models.

    Raises:
        BundleError: folder or file missing, invalid JSON, wrong schema version, malformed tables.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / BUNDLE_JSON
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder {bundle_dir} does not exist (export one with `pocus export`)")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a POCUS bundle (export one with `pocus export`)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); the bundle is damaged, export it again") from e
    if not isinstance(info, dict):
        raise BundleError(f"{path}: expected a JSON object")
    _check_schema(info.get("schema_version"), path)
    files, manifest = info.get("files"), info.get("manifest")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: 'files' must list the model files with sha256, size_bytes and precision")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size_bytes"), int) or entry.get("precision") not in PRECISIONS):
            raise BundleError(f"{path}: entry for {name} needs sha256, size_bytes and a precision in {PRECISIONS}")
        if Path(name).name != name:
            raise BundleError(f"{path}: file name {name!r} must be a plain name inside the bundle folder")
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: 'manifest' is missing")
    _check_schema(manifest.get("schema_version"), path, what="manifest schema_version")
    return info


def _check_schema(version: Any, path: Path, what: str = "schema_version") -> None:
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: {what} is {version!r} but this runtime reads version {SCHEMA_VERSION}; "
                          "re-export the bundle with this version of `pocus export`")


def verify_file(bundle_dir: str | os.PathLike, name: str, entry: Mapping[str, Any]) -> Path:
    """Check one model file's size and SHA-256 against its bundle.json entry.

    Raises:
        BundleError: missing, truncated/grown, or modified file.
    """
    path = Path(bundle_dir) / name
    if not path.is_file():
        raise BundleError(f"{path} is missing (listed in {BUNDLE_JSON})")
    size = path.stat().st_size
    if size != entry["size_bytes"]:
        kind = "truncated" if size < entry["size_bytes"] else "larger than expected"
        raise BundleError(f"{path} is {kind}: {size} bytes, {BUNDLE_JSON} says {entry['size_bytes']}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise BundleError(f"{path} has been modified: SHA-256 {digest[:16]}... does not match "
                          f"{BUNDLE_JSON} ({entry['sha256'][:16]}...)")
    return path


def verify_bundle(bundle_dir: str | os.PathLike) -> dict:
    """Check bundle.json and the size and hash of every file it lists (no session is built).

    Returns:
        The parsed bundle.json.

    Raises:
        BundleError: the first problem found.
    """
    info = read_bundle_json(bundle_dir)
    for name, entry in info["files"].items():
        verify_file(bundle_dir, name, entry)
    return info


def _choose_precision(info: dict, path: Path, profile: Profile, precision: str | None,
                      providers: list[tuple[str, dict]]) -> tuple[str, str]:
    """(precision, file name) to load: the requested one, else the profile's first usable one."""
    by_precision = {entry["precision"]: name for name, entry in info["files"].items()}
    if precision is not None:
        if precision not in by_precision:
            raise BundleError(f"{path}: no {precision} model in this bundle (it has {', '.join(sorted(by_precision))})")
        return precision, by_precision[precision]
    has_gpu = any(name in GPU_PROVIDERS for name, _ in providers)
    for p in profile.precision:
        if p in by_precision and (p != "fp16" or has_gpu):
            return p, by_precision[p]
    fallback = "fp32" if "fp32" in by_precision else sorted(by_precision)[0]
    warnings.warn(f"profile '{profile.name}' prefers {', '.join(profile.precision)} but bundle {path.parent} has "
                  f"{', '.join(sorted(by_precision))} (usable here); using {fallback}", stacklevel=3)
    return fallback, by_precision[fallback]


def _session_options(profile: Profile, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = profile.intra_op_num_threads if threads is None else threads
    so.inter_op_num_threads = profile.inter_op_num_threads if threads is None else 1
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[profile.graph_optimization_level]
    so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if profile.execution_mode == "parallel"
                         else ort.ExecutionMode.ORT_SEQUENTIAL)
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return so


def _strip(manifest: Mapping[str, Any]) -> dict:
    return {k: v for k, v in manifest.items() if k not in PER_FILE_KEYS}


def _shape_matches(actual: list, expected: list) -> bool:
    """Same rank, and every fixed (positive int) dimension of the manifest equal; symbolic ones match anything."""
    if len(actual) != len(expected):
        return False
    return all(a == e for a, e in zip(actual, expected) if isinstance(e, int) and e > 0)


@dataclass
class Bundle:
    """A verified model and its onnxruntime session. Create with `load_bundle`.

    Attributes:
        path: the ONNX file in use.
        dir: the bundle folder.
        manifest: the manifest embedded in that file (dict).
        precision: fp32 | fp16 | int8.
        providers: execution providers the session really uses, in order.
        profile: the Profile it was loaded with.
        session: the onnxruntime.InferenceSession.
    """

    path: Path
    dir: Path
    manifest: dict
    precision: str
    providers: list[str]
    profile: Profile
    session: Any = field(repr=False)

    @property
    def input_name(self) -> str:
        return self.manifest["input"]["name"]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def input_size(self) -> int:
        """Side of the square model input in pixels (H = W)."""
        return int(self.manifest["input"]["shape"][-1])

    @property
    def thresholds(self) -> dict:
        return self.manifest["thresholds"]

    @property
    def name(self) -> str:
        """`<model name> <version> <precision>`, for status bars and logs."""
        model = self.manifest.get("model", {})
        return f"{model.get('name', 'model')} {model.get('version', '')} {self.precision}".replace("  ", " ")

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run the model on a batch made by devices.preprocess.preprocess.

        Args:
            x: float32 [B, 1, H, W] (or [1, H, W] for one frame, given a batch axis here).

        Returns:
            {output name: array}, e.g. view_logits [B, V+1], quality [B, V], action_logits [B, V, A],
            pose_offset [B, V, 5].

        Raises:
            ValueError: wrong dtype or shape.
        """
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        size = self.input_size
        if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (1, size, size):
            raise ValueError(f"{self.path.name} needs float32 [B, 1, {size}, {size}] "
                             f"(devices.preprocess.preprocess), got {x.dtype} {list(x.shape)}")
        outputs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x)})
        return dict(zip(self.output_names, outputs))


def load_bundle(dir: str | os.PathLike | None = None, profile: str | os.PathLike | Profile = "cpu",
                precision: str | None = None, threads: int | None = None) -> Bundle:
    """Verify a bundle and build its onnxruntime session.

    Args:
        dir: bundle folder; None = the bundle shipped in edge_app/bundles/default.
        profile: device profile name, YAML path or Profile (providers, threads, preferred precision).
        precision: fp32 | fp16 | int8 to force one file; None = the profile's first one the bundle has.
        threads: override the profile's intra-op thread count (benchmarks pin it).

    Returns:
        The loaded Bundle.

    Raises:
        BundleError: missing folder or file, schema mismatch, SHA-256 or size mismatch, a manifest that
            differs from bundle.json, or input/output names and shapes that differ from the manifest.
    """
    import onnxruntime as ort

    bundle_dir = Path(dir) if dir is not None else DEFAULT_BUNDLE_DIR
    if precision is not None and precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    prof = load_profile(profile)
    info = read_bundle_json(bundle_dir)
    providers = prof.available_providers()
    precision, name = _choose_precision(info, bundle_dir / BUNDLE_JSON, prof, precision, providers)
    path = verify_file(bundle_dir, name, info["files"][name])

    try:
        session = ort.InferenceSession(str(path), sess_options=_session_options(prof, threads),
                                       providers=[p for p, _ in providers],
                                       provider_options=[o for _, o in providers])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors; name the file
        raise BundleError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from e

    raw = session.get_modelmeta().custom_metadata_map.get(MANIFEST_KEY)
    if raw is None:
        raise BundleError(f"{path}: no '{MANIFEST_KEY}' in the model's metadata_props (not exported by `pocus export`)")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: embedded manifest is not valid JSON ({e})") from e
    _check_schema(manifest.get("schema_version"), path, what="embedded manifest schema_version")
    if _strip(manifest) != _strip(info["manifest"]):
        diff = sorted(k for k in set(manifest) | set(info["manifest"])
                      if k not in PER_FILE_KEYS and manifest.get(k) != info["manifest"].get(k))
        raise BundleError(f"{path}: embedded manifest differs from {BUNDLE_JSON} in {', '.join(diff)}; "
                          "the files come from different exports")
    if manifest.get("precision") != precision:
        raise BundleError(f"{path}: manifest says precision {manifest.get('precision')!r}, "
                          f"{BUNDLE_JSON} says {precision!r}")
    _check_io(session, manifest, path)
    return Bundle(path=path, dir=bundle_dir, manifest=manifest, precision=precision,
                  providers=list(session.get_providers()), profile=prof, session=session)


def _check_io(session, manifest: dict, path: Path) -> None:
    """Input/output names, order and shapes of the session against the manifest."""
    inputs = session.get_inputs()
    spec = manifest.get("input", {})
    if len(inputs) != 1 or inputs[0].name != spec.get("name") or not _shape_matches(inputs[0].shape, spec.get("shape", [])):
        got = [(i.name, i.shape) for i in inputs]
        raise BundleError(f"{path}: model input {got} does not match the manifest ({spec.get('name')}, {spec.get('shape')})")
    outputs = [(o.name, o.shape) for o in session.get_outputs()]
    expected = [(o["name"], o["shape"]) for o in manifest.get("outputs", [])]
    if [n for n, _ in outputs] != [n for n, _ in expected] or not all(
            _shape_matches(a, e) for (_, a), (_, e) in zip(outputs, expected)):
        raise BundleError(f"{path}: model outputs {outputs} do not match the manifest {expected}")


# ----------------------------------------------------------------------------------------------
# Scores for the runtime safety gate (one definition, used by export calibration too)
# ----------------------------------------------------------------------------------------------

def view_scores(view_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and OOD score from view logits [..., V+1].

    Returns:
        (confidence, energy): confidence = max softmax (low = unsure; compare with
        thresholds.confidence_min); energy = -logsumexp(logits) (Liu et al. 2020; high = out of
        distribution; compare with thresholds.ood_energy_max).
    """
    z = np.asarray(view_logits, dtype=np.float64)
    top = z.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(z - top).sum(axis=-1))
    confidence = np.exp(top[..., 0] - lse)
    return confidence, -lse
