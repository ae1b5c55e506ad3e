"""Device profiles: the shipped YAML files parse, bad ones fail clearly, missing providers fall back."""
import pytest

from edge_app.bundle import KNOWN_PROVIDERS, BundleError, Profile, load_profile, parse_profile, profile_names


def test_shipped_profiles_are_listed():
    assert {"cpu", "jetson-orin", "desktop-cuda"} <= set(profile_names())


@pytest.mark.parametrize("name", profile_names())
def test_shipped_profile_parses(name):
    p = load_profile(name)
    assert p.name == name and p.path is not None and p.path.name == f"{name}.yaml"
    assert p.providers[-1][0] == "CPUExecutionProvider"  # every profile ends on the CPU
    assert all(provider in KNOWN_PROVIDERS for provider, _ in p.providers)
    assert p.precision and p.intra_op_num_threads >= 1


def test_cpu_profile_values():
    p = load_profile("cpu")
    assert p.precision == ("int8", "fp32")
    assert p.providers == (("CPUExecutionProvider", {}),)
    assert p.intra_op_num_threads in (1, 2)


def test_jetson_profile_tensorrt_first():
    p = load_profile("jetson-orin")
    assert [name for name, _ in p.providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                 "CPUExecutionProvider"]
    trt = dict(p.providers)["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert "trt_int8_enable" in trt and trt["trt_engine_cache_path"]


def test_load_by_path_and_passthrough(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("precision: fp32\nproviders: [CPUExecutionProvider]\nsession: {intra_op_num_threads: 2}\n")
    p = load_profile(path)
    assert (p.name, p.precision, p.intra_op_num_threads) == ("mine", ("fp32",), 2)
    assert load_profile(p) is p


def test_unknown_provider_lists_known_ones():
    with pytest.raises(BundleError, match="unknown execution provider 'CudaProvider'; known providers: .*CUDAExecutionProvider"):
        parse_profile({"providers": ["CudaProvider"]})


@pytest.mark.parametrize("data, message", [
    ({"providers": ["CPUExecutionProvider"], "threads": 2}, "unknown keys threads"),
    ({"precision": ["int4"]}, "precision must be a list drawn from fp32, fp16, int8"),
    ({"session": {"intra_op_num_threads": -1}}, "intra_op_num_threads must be an integer >= 0"),
    ({"session": {"intra_op_num_threads": "two"}}, "intra_op_num_threads must be an integer"),
    ({"session": {"graph_optimization_level": "max"}}, "graph_optimization_level must be one of"),
    ({"session": {"threads": 1}}, "session has unknown keys"),
    ({"providers": [{"name": "CPUExecutionProvider", "opts": {}}]}, "unknown keys opts"),
    ([1, 2], "expected a mapping"),
])
def test_bad_profiles(data, message):
    with pytest.raises(BundleError, match=message):
        parse_profile(data)


def test_unknown_profile_name_and_bad_yaml(tmp_path):
    with pytest.raises(BundleError, match="unknown profile 'tpu': choose one of .*cpu"):
        load_profile("tpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [CPUExecutionProvider\n")
    with pytest.raises(BundleError, match="not valid YAML"):
        load_profile(bad)
    with pytest.raises(BundleError, match="does not exist"):
        load_profile(tmp_path / "missing.yaml")


def test_unavailable_providers_are_skipped_with_a_warning():
    import onnxruntime as ort

    p = Profile(name="t", providers=(("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {})))
    have = set(ort.get_available_providers())
    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} <= have:
        pytest.skip("this onnxruntime build has TensorRT and CUDA: nothing to skip")
    with pytest.warns(UserWarning, match="is not available in this onnxruntime build"):
        chosen = p.available_providers()
    assert chosen[-1] == ("CPUExecutionProvider", {})  # CPU added as the fallback
    assert all(name in have for name, _ in chosen)


def test_gpu_profile_on_gpu():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime build (CPU-only machine)")
    chosen = load_profile("desktop-cuda").available_providers()
    assert chosen[0][0] == "CUDAExecutionProvider"
