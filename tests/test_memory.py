"""Fitting the hardware: nf4 weights (token-identical to transformers with the same BitsAndBytesConfig; int8 and int4:
test_int8.py),
bfloat16 on CPUs that compute it, the memory check before loading, out-of-memory as exit 8, caption's back-off,
`videoqa models`."""

import json
import sys

import pytest
import torch

import videoqa
from conftest import asset, assert_clean_failure, build_video_llava, needs_assets, reference_net, reference_pixels
from conftest import reference_prompt
from videoqa.errors import Exit
from videoqa.frames import read_frames

pytestmark = needs_assets
VIDEO = asset("videos/videollava_sample_demo_1.mp4")
QUESTION = "Why is this video funny?"
# The skip list written out by hand: full module paths (a bare "video_tower" matches nothing in transformers 5)
SKIP = ["model.video_tower", "model.image_tower", "model.multi_modal_projector", "lm_head"]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny Video-LLaVA whose language model is 256 wide, so that 4-bit blocks of 64 and int8 rows apply."""
    return build_video_llava(tmp_path_factory.mktemp("wide"), text=dict(hidden_size=256, intermediate_size=512))


def reference_quantized(path, quantize: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy answer with the model loaded through the same BitsAndBytesConfig."""
    from transformers import BitsAndBytesConfig, VideoLlavaForConditionalGeneration

    bits = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP) if quantize == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=SKIP))
    net = VideoLlavaForConditionalGeneration.from_pretrained(path, quantization_config=bits, device_map="cpu",
                                                             dtype=torch.float32).eval()
    _, tokenizer = reference_net(path)
    frames = read_frames(VIDEO, 8)
    ids = torch.tensor([reference_prompt(net, tokenizer, frames, QUESTION)])
    out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=max_new_tokens, pixel_values_videos=reference_pixels(net, list(frames.pixels))[None])
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quantize, share", [("nf4", 0.40)])
def test_quantized_answers_equal_transformers_and_weigh_less(cli, wide_model, quantize, share):
    result = cli("ask", VIDEO, QUESTION, "-m", wide_model, "-n", 10, "--json", "--quantize", quantize)
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["runtime"]["quantize"] == quantize
    assert record["tokens"] == reference_quantized(wide_model, quantize, 10)

    model = videoqa.load(wide_model, device="cpu", dtype="float32", quantize=quantize, cache=False)
    layers = model.net.model.language_model.layers
    held = sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])
    float32 = sum(t.numel() * 4 for t in videoqa.load(wide_model, device="cpu", dtype="float32", cache=False)
                  .net.model.language_model.layers.parameters())
    assert held < share * float32, (held, float32)


def test_quantized_features_are_unchanged_and_cached_once(wide_model, counted):
    from videoqa.cache import cache_dir

    def load(quantize, cache):
        return videoqa.load(wide_model, device="cpu", dtype="float32", quantize=quantize, cache=cache)

    assert torch.equal(load("none", False).features(VIDEO), load("nf4", False).features(VIDEO))  # vision unquantized
    load("none", True).features(VIDEO)
    load("nf4", True).features(VIDEO)
    assert len(list(cache_dir().glob("*.safetensors"))) == 1
    assert counted["towers"] == [8, 8, 8]  # the nf4 model found the plain one's entry: no fourth tower run


def test_compiled_step_with_nf4_equals_eager(wide_model):
    model = videoqa.load(wide_model, device="cpu", dtype="float32", quantize="nf4", cache=False)
    eager = model.ask(VIDEO, QUESTION, max_new_tokens=12).tokens
    model.compiled = True  # the CUDA path, forced on the CPU
    assert model.ask(VIDEO, QUESTION, max_new_tokens=12).tokens == eager


def test_without_bitsandbytes_quantize_names_the_extra(cli, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--quantize", "nf4")
    assert_clean_failure(result, Exit.MODEL, "bitsandbytes", "pip install 'videoqa[quant]'")


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_cpu_follows_the_bf16_probe(cli, tiny_model, monkeypatch, native, expected):
    from videoqa import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: native)
    record = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 2, "--json").out)
    assert record["runtime"] == {"device": "cpu", "dtype": expected, "quantize": "none"}
    forced = json.loads(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 2, "--json", "--dtype", "float32").out)
    assert forced["runtime"]["dtype"] == "float32"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_auto_dtype_with_cpu_quantization_is_bfloat16_either_way(cli, wide_model, monkeypatch, native, quantize):
    """torch's int8 and int4 kernels for the CPU are fast with bfloat16 activations only, native or not."""
    from videoqa import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: native)
    record = json.loads(cli("ask", VIDEO, QUESTION, "-m", wide_model, "-n", 2, "--json", "--quantize", quantize).out)
    assert record["runtime"] == {"device": "cpu", "dtype": "bfloat16", "quantize": quantize}
    forced = cli("ask", VIDEO, QUESTION, "-m", wide_model, "-n", 2, "--json", "--quantize", quantize, "--dtype",
                 "float32")
    assert json.loads(forced.out)["runtime"]["dtype"] == "float32"


def test_the_bf16_probe_reads_the_cpu_flags(monkeypatch):
    from pathlib import Path

    from videoqa import models

    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo here")
    monkeypatch.undo()  # the suite's stand-in (float32 for comparisons with transformers) is put back
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert models.cpu_has_bf16() == bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def test_the_memory_check_refuses_past_max_memory_and_accepts_without(cli, tiny_model):
    refused = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 2, "--max-memory", "1MB")
    assert_clean_failure(refused, Exit.MEMORY, "needs", "weights", "KV cache", "activations", "--max-memory", "1.0 MB",
                         "nothing fits")  # nf4 (~228 MB) would need more than the unquantized model's 173.5 MB
    assert cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 2, "--json").code == 0
    skipped = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 2, "--max-memory", "1MB", "--skip-memory-check")
    assert skipped.code == 0
    assert_clean_failure(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--max-memory", "lots"), Exit.USAGE,
                         "--max-memory")


def test_the_estimate_counts_what_the_checkpoint_holds(tiny_model):
    """Hand-computed from the tiny checkpoint: its weights are every tensor in the file, at 4 bytes in float32."""
    from safetensors.torch import load_file

    from videoqa.session import Checkpoint

    elements = sum(t.numel() for t in load_file(tiny_model / "model.safetensors").values())
    found = Checkpoint(tiny_model, device="cpu", dtype="float32", check_memory=False, cache=False)
    estimate = found.estimate(max_new_tokens=20)
    assert estimate.weights == elements * 4
    # KV cache: 2 layers x (K, V) x 4 heads x 16 dims x 4 bytes x the 256-position bucket (40 + 64 + 20 positions)
    assert estimate.kv_cache == 2 * 2 * 4 * 16 * 4 * 256
    assert found.estimate(max_new_tokens=20, quantize="nf4").weights < estimate.weights
    # Decoding stops at the context (4096 positions): asking for more tokens needs no more cache than that
    assert found.estimate(max_new_tokens=3_000_000).kv_cache == 2 * 2 * 4 * 16 * 4 * 4096


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_decode_is_exit_8(cli, tiny_model, monkeypatch):
    from videoqa import decode

    real, calls = decode.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) if len(calls) == 1 else oom()  # the prefill runs; the first step fails

    monkeypatch.setattr(decode, "forward", forward)
    assert_clean_failure(cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 5, "--json"), Exit.MEMORY,
                         "out of memory", "decode", "--quantize nf4")
    calls.clear()
    streamed = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "-n", 5)  # the first token was already shown
    assert streamed.code == Exit.MEMORY and streamed.err.startswith("error: out of memory during decode")
    assert len(streamed.err.splitlines()) == 1 and "Traceback" not in streamed.err


def test_caption_backs_off_to_smaller_batches(cli, tiny_model, tmp_path, monkeypatch):
    import shutil

    from videoqa import decode

    videos = []
    for i, name in enumerate(["videollava_sample_demo_1.mp4", "videollava_sample_demo_3.mp4",
                              "videollava_sample_demo_9.mp4", "videollama2_1034346401.mp4", "llavanext_docs_jobs.mp4"]):
        videos.append(tmp_path / f"{i}.mp4")
        shutil.copy(asset(f"videos/{name}"), videos[-1])
    alone = cli("caption", *videos, "-m", tiny_model, "-n", 4, "-b", 1)
    real = decode.forward

    def forward(lm, embeds, *args, **kwargs):
        if embeds.shape[0] in (4, 2):  # batches of 4 and 2 run out of memory; 1 fits
            oom()
        return real(lm, embeds, *args, **kwargs)

    monkeypatch.setattr(decode, "forward", forward)
    result = cli("caption", *videos, "-m", tiny_model, "-n", 4, "-b", 4)
    assert result.code == 0, result
    records = [json.loads(line) for line in result.out.splitlines()]
    assert [r["video"] for r in records] == [str(v) for v in videos]  # every video exactly once, in order
    assert [r["tokens"] for r in records] == [json.loads(line)["tokens"] for line in alone.out.splitlines()]
    assert "backed off" in result.err and "3 times" in result.err  # 4 -> 2 + 2, then each 2 -> 1 + 1


def test_models_lists_presets_with_estimates(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    result = cli("models", "--json")
    assert result.code == 0, result
    rows = {row["name"]: row for row in map(json.loads, result.out.splitlines())}
    assert {"video-llava-7b", "llava-onevision-0.5b", "llava-1.5-7b", "llava-next-video-34b"} <= rows.keys()
    video_llava = rows["video-llava-7b"]
    assert video_llava["repo"] == "LanguageBind/Video-LLaVA-7B-hf" and video_llava["cached"] is False
    # 7,366,279,168 parameters (the hub's 7.37B) at 2 bytes, before the KV cache and activations
    assert 7_366_279_168 * 2 < video_llava["memory_bytes"]["float16"] < 7_366_279_168 * 2 * 1.3
    assert video_llava["memory_bytes"]["nf4"] < video_llava["memory_bytes"]["float16"]
    assert rows["llava-onevision-0.5b"]["memory_bytes"]["float16"] < 4e9
    table = cli("models")
    assert table.code == 0 and "video-llava-7b" in table.out and "nf4" in table.out


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_without_torchao_cpu_quantization_names_the_extra(cli, tiny_model, monkeypatch, quantize):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    result = cli("ask", VIDEO, QUESTION, "-m", tiny_model, "--quantize", quantize)
    assert_clean_failure(result, Exit.MODEL, "torchao", "pip install 'videoqa[quant]'")


def test_models_lists_int4_on_a_cpu_over_bfloat16(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    result = cli("models", "--json", "--device", "cpu")
    row = {r["name"]: r for r in map(json.loads, result.out.splitlines())}["video-llava-7b"]["memory_bytes"]
    # 6.7B linear weights at half a byte beside 0.6B others in bfloat16: well under int8's, which is under bfloat16's
    assert row["int4"] < row["int8"] < row["bfloat16"] and row["int4"] < 0.5 * row["bfloat16"]


CPUINFO = "".join(f"processor\t: {cpu}\nphysical id\t: {package}\ncore id\t\t: {core}\n\n"
                  for cpu, package, core in [(0, 0, 0), (1, 0, 1), (2, 0, 0), (3, 0, 1), (4, 1, 0), (5, 1, 0)])


@pytest.mark.parametrize("allowed, cores", [({0, 1, 2, 3, 4, 5}, 3), ({0, 2}, 1), ({0, 1}, 2), ({4, 5}, 1)])
def test_physical_cores_count_smt_siblings_once(allowed, cores):
    from videoqa.models import physical_cores

    assert physical_cores(CPUINFO, allowed) == cores  # CPUs 0 and 2 are one core's two threads, as are 4 and 5


def test_a_cgroup_quota_caps_the_threads():
    from videoqa.models import quota_cpus

    assert quota_cpus("max 100000") is None
    assert quota_cpus("150000 100000\n") == 2 and quota_cpus("50000 100000") == 1 and quota_cpus("400000 100000") == 4


def test_the_load_sets_one_thread_per_core_the_process_may_use(tiny_model):
    """torch's default counts the machine's cores; a process pinned to one CPU gets one thread."""
    import os
    import subprocess

    from videoqa.models import cpu_threads

    if len(os.sched_getaffinity(0)) < 2 or cpu_threads() < 2:
        pytest.skip("needs two physical cores to pin to one")
    code = ("import os, torch, videoqa; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            f"before = torch.get_num_threads(); videoqa.load({str(tiny_model)!r}, device='cpu', cache=False); "
            "print(before, torch.get_num_threads())")
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.split()
    assert int(before) >= 2 and int(after) == 1
