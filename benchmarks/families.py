"""Speed here of each family's real language model: prefill and decode, videoqa against transformers' `generate`.

    python benchmarks/families.py qwen2.5-vl-3b [--dtype bfloat16] [--tokens 32] [--frames 8] [--json]

For the preset named, a random-weight checkpoint is built with the preset's REAL language-model dimensions (layers,
hidden, heads, KV heads, head_dim, intermediate, vocabulary rows, tied or untied head, RoPE / M-RoPE sections and
theta, context), taken from the hub configs (PRESETS below; cross-checked against the preset's [memory] table), and
a SMALL vision tower of the family's real patch geometry (patch size, merge, temporal patch, window attention,
DeepStack layers; SigLIP's image size and pixel-shuffle factor), so a frame takes the real number of positions. The
tower's width and depth do not change decode speed (the tower runs once, before the prefill; decoding reads only the
language model and the KV cache), so the decode figures are the real model's; the prefill figures are the language
model's on the real prompt length plus a tower that costs next to nothing (the real tower adds its own time on top).
The preprocessor configs are the hub's (JSON copied from the hub files); the tokenizer is the test suite's
(tests/qwen_fixtures.py, tests/smolvlm_fixtures.py, tests/onevision_fixtures.py: a small byte-level BPE with the
family's special tokens in their real order), so the vocabulary is a few hundred pieces while the embedding and the
head have the real vocabulary's rows, and the question's text is a few tokens more or fewer than with the real one.

It is saved with save_pretrained to a temporary folder under /tmp (deleted at the end), loaded with
`videoqa.load(dir, device="cpu", dtype=...)`, and one question is asked about videollava_sample_demo_1.mp4
(640 x 360, `--frames` frames): through videoqa's API (`model.chat(media).ask(...)`, its Answer.timings) and through
transformers' `generate` on the same weights (videoqa's `model.net`: no second copy), the same prompt ids (the
chat's own) and the same pixels. Both decode greedily for exactly `--tokens` new tokens: EOS is switched off on both
sides (a random model may produce it at any step). One warm-up run each, then one timed run each.

Figures: "prefill" is pixels (from the decoded frames) -> first token: videoqa's timings["vision"] +
timings["prefill"], transformers' from the call to `generate` (pixels made inside the timed span) to the streamer's
first new token; "decode tokens/s" is (tokens - 1) / (last token - first token) on both sides. The load average
(`os.getloadavg`, this run's own two threads included) is reported before and after each side, and the share of
the cores that OTHER processes used during each timed run (`others_cpu_share`, from /proc/stat less this process's
CPU time). Other work matters much more than its share: with two OpenMP threads on two cores, every parallel
region waits for a thread the scheduler has put off, so one busy core elsewhere can cut decode speed several-fold.
So each timed run waits for a quiet machine first and is repeated (`--tries`, 3) while others took more than
`--clean` (0.1) of the cores during it; the least disturbed run is reported.

`--layers N` keeps only the first N decoder layers (a smoke test of the script; the figures are then not the
preset's).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tokenizers and chat templates
ASSETS = ROOT.parent / "shared" / "assets"
VIDEO = ASSETS / "videos" / "videollava_sample_demo_1.mp4"
QUESTION = "Why is this video funny?"

# --- the hub's preprocessor configs, verbatim (/tmp/hubfacts.md section 2) ---------------------------------------
QWEN2_5_VL_PREPROCESSOR = {  # Qwen/Qwen2.5-VL-{3B,7B}-Instruct preprocessor_config.json (no video file on the hub)
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
QWEN3_VL_PREPROCESSOR = {  # Qwen/Qwen3-VL-{2B,4B,8B}-Instruct preprocessor_config.json
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN3_VL_VIDEO_PREPROCESSOR = {  # ... and video_preprocessor_config.json
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}


def smolvlm_preprocessor(side: int, longest: int) -> dict:
    """HuggingFaceTB/SmolVLM2-*-Instruct preprocessor_config.json: 256M/500M side 512, longest 2048 (verbatim);
    2.2B 384 and 1536 (the same keys)."""
    return {
        "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SmolVLMImageProcessor",
        "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": side}, "processor_class": "SmolVLMProcessor",
        "resample": 1, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": longest},
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": side}},
    }


# --- the presets' language models, as the hub configs give them (/tmp/hubfacts.md section 1) --------------------
def lm(layers, hidden, heads, kv, head_dim, intermediate, vocab, tied, context, theta, **rope):
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=tied,
                max_position_embeddings=context, rope_parameters={"rope_type": "default", "rope_theta": theta, **rope})


QWEN2_5_ROPE = dict(mrope_section=[16, 24, 24])
QWEN3_ROPE = dict(mrope_section=[24, 20, 20], mrope_interleaved=True)
PRESETS = {
    "qwen2.5-vl-3b": ("qwen2_5_vl", lm(36, 2048, 16, 2, 128, 11008, 151936, True, 128000, 1e6, **QWEN2_5_ROPE), {}),
    "qwen2.5-vl-7b": ("qwen2_5_vl", lm(28, 3584, 28, 4, 128, 18944, 152064, False, 128000, 1e6, **QWEN2_5_ROPE), {}),
    "qwen3-vl-2b": ("qwen3_vl", lm(28, 2048, 16, 8, 128, 6144, 151936, True, 262144, 5e6, **QWEN3_ROPE),
                    dict(deepstack=3)),
    "qwen3-vl-4b": ("qwen3_vl", lm(36, 2560, 32, 8, 128, 9728, 151936, True, 262144, 5e6, **QWEN3_ROPE),
                    dict(deepstack=3)),
    "qwen3-vl-8b": ("qwen3_vl", lm(36, 4096, 32, 8, 128, 12288, 151936, False, 262144, 5e6, **QWEN3_ROPE),
                    dict(deepstack=3)),
    "smolvlm2-256m": ("smolvlm", lm(30, 576, 9, 3, 64, 1536, 49280, False, 8192, 1e5),
                      dict(patch=16, image=512, scale=4, longest=2048, seq=64)),
    "smolvlm2-500m": ("smolvlm", lm(32, 960, 15, 5, 64, 2560, 49280, False, 8192, 1e5),
                      dict(patch=16, image=512, scale=4, longest=2048, seq=64)),
    # the 2.2B's rope_theta was not read from its config (hubfacts: "not read"): 1e5 as the smaller two; it does not
    # change the speed
    "smolvlm2-2.2b": ("smolvlm", lm(24, 2048, 32, 32, 64, 8192, 49280, False, 8192, 1e5),
                      dict(patch=14, image=384, scale=3, longest=1536, seq=81)),
    # Qwen2-0.5B in llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    "llava-onevision-0.5b": ("llava_onevision", lm(24, 896, 14, 2, 64, 4864, 151936, True, 32768, 1e6), {}),
}


def checked(name: str, text: dict) -> None:
    """The dimensions against the preset's [memory] table (presets/, or the pending copies in /tmp)."""
    for folder in (ROOT / "presets", Path("/tmp/presets-pending")):
        file = folder / f"{name}.toml"
        if file.is_file():
            table = tomllib.loads(file.read_text()).get("memory", {})
            ours = dict(layers=text["num_hidden_layers"], kv_heads=text["num_key_value_heads"],
                        head_dim=text["head_dim"], hidden=text["hidden_size"],
                        intermediate=text["intermediate_size"], vocab=text["vocab_size"])
            wrong = {k: (v, table[k]) for k, v in ours.items() if k in table and table[k] != v}
            if wrong:
                raise SystemExit(f"{name}: dimensions differ from {file} (here, there): {wrong}")
            return
    print(f"note: no preset file for {name} to check the dimensions against", file=sys.stderr)


# --- the checkpoints ----------------------------------------------------------------------------------------------
def qwen_config(family: str, text: dict, tokenizer, extra: dict):
    from qwen_fixtures import ids_of
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = ids_of(tokenizer)
    tied = text.pop("tie_word_embeddings")
    text = {**text, "eos_token_id": ids["im_end"], "pad_token_id": ids["endoftext"], "rms_norm_eps": 1e-6}
    hidden = text["hidden_size"]
    special = dict(image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                   vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                   eos_token_id=ids["im_end"], pad_token_id=ids["endoftext"], tie_word_embeddings=tied)
    if family == "qwen2_5_vl":
        text.pop("head_dim")  # hidden / heads = 128, as the real config (which has no head_dim)
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    layers = extra["deepstack"]  # the real towers feed their merged rows to the first 3 decoder layers
    vision = dict(depth=layers, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=hidden,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=list(range(layers)), hidden_act="gelu_pytorch_tanh")
    return Qwen3VLConfig(text_config={**text, "tie_word_embeddings": tied}, vision_config=vision, **special)


def build(name: str, folder: Path, dtype: torch.dtype, layers: int | None, vision: dict | None = None) -> dict:
    """Save the random checkpoint of preset `name` in `folder`; its language model's dimensions. `vision`: the
    tower's dimensions over the small default (OneVision's SigLIP and SmolVLM2's only: benchmarks/cpu.py)."""
    family, text, extra = PRESETS[name]
    text = json.loads(json.dumps(text))
    checked(name, text)
    if layers:
        text["num_hidden_layers"] = layers
    dims = dict(text)
    files: dict[str, dict] = {}
    if family in ("qwen2_5_vl", "qwen3_vl"):
        from qwen_fixtures import QWEN2_5_VL_CHAT_TEMPLATE, QWEN3_VL_CHAT_TEMPLATE, build_qwen_tokenizer
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

        tokenizer = build_qwen_tokenizer(folder)
        config = qwen_config(family, dict(text), tokenizer, extra)
        if family == "qwen2_5_vl":
            model_class = Qwen2_5_VLForConditionalGeneration
            files = {"preprocessor_config.json": QWEN2_5_VL_PREPROCESSOR,
                     "chat_template.json": {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}}
        else:
            model_class = Qwen3VLForConditionalGeneration
            files = {"preprocessor_config.json": QWEN3_VL_PREPROCESSOR,
                     "video_preprocessor_config.json": QWEN3_VL_VIDEO_PREPROCESSOR,
                     "chat_template.json": {"chat_template": QWEN3_VL_CHAT_TEMPLATE}}
    elif family == "smolvlm":
        from smolvlm_fixtures import CHAT_TEMPLATE, build_tokenizer
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

        tokenizer = build_tokenizer()
        ids = dict(zip(("bos", "eos", "pad", "image"), tokenizer.convert_tokens_to_ids(
            ["<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<image>"])))
        tied = text.pop("tie_word_embeddings")
        config = SmolVLMConfig(
            text_config=dict(model_type="llama", **text, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                             pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"]),
            vision_config={**dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                  patch_size=extra["patch"], image_size=extra["image"]), **(vision or {})},
            scale_factor=extra["scale"], image_token_id=ids["image"], tie_word_embeddings=tied,
            pad_token_id=ids["pad"],
        )
        model_class = SmolVLMForConditionalGeneration
        files = {"preprocessor_config.json": smolvlm_preprocessor(extra["image"], extra["longest"]),
                 "processor_config.json": {"image_seq_len": extra["seq"], "processor_class": "SmolVLMProcessor"},
                 "chat_template.json": {"chat_template": CHAT_TEMPLATE},
                 "generation_config.json": {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                            "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}}
    elif family == "llava_onevision":
        from onevision_fixtures import QWEN2_SPECIALS, build_tokenizer_qwen2, tiny_siglip
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
        from transformers import SiglipVisionConfig

        tokenizer = build_tokenizer_qwen2(folder)
        specials = tokenizer.convert_tokens_to_ids(list(QWEN2_SPECIALS))
        text.pop("head_dim")
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision) if vision else tiny_siglip(), text_config=Qwen2Config(**text, bos_token_id=specials[0],
                                                                 eos_token_id=specials[2], rms_norm_eps=1e-6),
            image_token_index=specials[3], video_token_index=specials[4], vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=text["tie_word_embeddings"],
        )
        model_class = LlavaOnevisionForConditionalGeneration
    else:
        raise SystemExit(f"{name}: family {family} is not handled here")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the measured dtype: a 7B never exists in float32 here
    try:
        model = model_class(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    gc.collect()
    tokenizer.save_pretrained(folder)
    for file, content in files.items():
        (folder / file).write_text(json.dumps(content))
    return {"family": family, **dims}


# --- the machine's other work -------------------------------------------------------------------------------------
def cpu_times() -> tuple[float, float, float]:
    """(wall s, CPU s busy on the whole machine, CPU s of this process) now, from /proc."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    mine = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), mine.user + mine.system


def others(before, after) -> float:
    """The cores' share that other processes used between two cpu_times() (0: the machine was ours; 1: all of it)."""
    wall = after[0] - before[0]
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (wall * os.cpu_count())


def wait_quiet(limit: float, most: float = 900.0) -> float:
    """Wait (up to `most` s) until other processes use under `limit` of the cores over 3 s; the seconds waited."""
    waited = 0.0
    while waited < most:
        before = cpu_times()
        time.sleep(3)
        if others(before, cpu_times()) < limit:
            break
        waited += 3
    return waited


def measured(run, clean: float, tries: int) -> dict:
    """`run()` timed on a quiet machine: after a wait for one, again (up to `tries` runs in all) while other
    processes took more than `clean` of the cores during it; the run they disturbed least."""
    best = None
    for attempt in range(1, tries + 1):
        waited = wait_quiet(clean)
        before = cpu_times()
        result = run()
        result.update(others_cpu_share=others(before, cpu_times()), runs=attempt, waited_s=waited)
        if best is None or result["others_cpu_share"] < best["others_cpu_share"]:
            best = result
        if result["others_cpu_share"] <= clean:
            break
    return best


# --- the two ways of answering ------------------------------------------------------------------------------------
def no_eos() -> None:
    """videoqa's decode loop stops at the tokenizer's EOS; here it runs the whole budget (as generate with
    eos_token_id=None): the one decode function takes an EOS id that no token has."""
    import videoqa.decode as decode

    original = decode.generate

    def generate(lm, embeds, cache, max_new_tokens, eos_id, *args, **kwargs):
        return original(lm, embeds, cache, max_new_tokens, -1, *args, **kwargs)

    decode.generate = generate


def ours(model, media, tokens: int) -> dict:
    answer = model.chat(media).ask(QUESTION, max_new_tokens=tokens, temperature=0)
    t = answer.timings
    return {"prefill_s": t["vision"] + t["prefill"], "vision_s": t["vision"], "lm_prefill_s": t["prefill"],
            "decode_tokens_per_s": t["decode_tokens_per_s"], "tokens": answer.tokens,
            "prompt_tokens": t["prefill_tokens"]}


def inputs(model, media) -> dict:
    """What `generate` takes beside the ids for this family, from the decoded frames (videoqa's pixels, which the
    tests check against transformers' processors)."""
    net, frames, name = model.net, media.frames, model.family.name
    made = model.family.video.pixels(net.config, frames.pixels)
    if name in ("qwen2_5_vl", "qwen3_vl"):
        pixels, grid = made
        found = {"pixel_values_videos": pixels.to(net.dtype), "video_grid_thw": torch.tensor([grid])}
        if name == "qwen2_5_vl":
            times = frames.times
            found["second_per_grid_ts"] = torch.tensor([2 * (times[-1] - times[0]) / (len(times) - 1)])
        return found
    if name == "smolvlm":
        return {"pixel_values": torch.as_tensor(made)[None].to(net.dtype)}
    if name == "llava_onevision":
        return {"pixel_values_videos": torch.from_numpy(made)[None].to(net.dtype)}
    raise SystemExit(f"family {name} is not handled here")


def theirs(model, media, ids: list[int], tokens: int) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    net, clock = model.net, Clock()
    row = torch.tensor([ids])
    extra = {}
    if model.family.name in ("qwen2_5_vl", "qwen3_vl"):
        extra["mm_token_type_ids"] = ((row == net.config.image_token_id).int()
                                      + 2 * (row == net.config.video_token_id).int())
    start = time.perf_counter()
    with torch.inference_mode():
        out = net.generate(input_ids=row, attention_mask=torch.ones_like(row), **extra, **inputs(model, media),
                           do_sample=False, eos_token_id=None, max_new_tokens=tokens,
                           streamer=clock)
    new = out[0, row.shape[1]:].tolist()
    first, last = clock.times[1], clock.times[-1]
    return {"prefill_s": first - start, "decode_tokens_per_s": (len(new) - 1) / (last - first), "tokens": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=list(PRESETS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens, exactly (EOS off)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--layers", type=int, help="keep the first N decoder layers (a smoke test)")
    parser.add_argument("--clean", type=float, default=0.1,
                        help="the most of the cores other processes may take during a timed run [default: 0.1]")
    parser.add_argument("--tries", type=int, default=3, help="timed runs at most per side, while disturbed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import videoqa
    import videoqa.families

    family = PRESETS[args.preset][0]
    if family not in videoqa.families.FAMILIES:
        raise SystemExit(f"{args.preset}: family {family} is not registered in videoqa.families")
    dtype = getattr(torch, args.dtype)
    folder = Path(tempfile.mkdtemp(prefix=f"families-{args.preset}-", dir="/tmp"))
    try:
        started = time.perf_counter()
        dims = build(args.preset, folder, dtype, args.layers)
        built = time.perf_counter() - started
        model = videoqa.load(folder, device="cpu", dtype=args.dtype, cache=False)
        model.net.generation_config.eos_token_id = None
        no_eos()
        media = model.media(VIDEO, args.frames)
        ids = model.chat(media).next_ids(QUESTION)  # the chat's own prompt ids, for generate
        load = [os.getloadavg()[0]]
        ours(model, media, args.tokens)  # warm-up
        mine = measured(lambda: ours(model, media, args.tokens), args.clean, args.tries)
        load.append(os.getloadavg()[0])
        theirs(model, media, ids, args.tokens)  # warm-up
        reference = measured(lambda: theirs(model, media, ids, args.tokens), args.clean, args.tries)
        load.append(os.getloadavg()[0])
        a, b = mine.pop("tokens"), reference.pop("tokens")
        same = a == b
        differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if same else min(len(a), len(b)))
        parameters = sum(p.numel() for p in model.net.parameters())
        report = {
            "preset": args.preset, "dtype": args.dtype, "frames": args.frames, "new_tokens": args.tokens,
            "device": f"cpu ({torch.get_num_threads()} threads)", "prompt_tokens": len(ids),
            "language_model": {k: v for k, v in dims.items() if k != "rope_parameters"},
            "rope": dims["rope_parameters"], "parameters_built": parameters, "build_s": built,
            "same_tokens": same, "first_different_token": differ, "videoqa": mine, "transformers": reference,
            "decode_ratio": mine["decode_tokens_per_s"] / reference["decode_tokens_per_s"],
            "prefill_ratio": mine["prefill_s"] / reference["prefill_s"],
            "load_average": {"start": load[0], "after_videoqa": load[1], "after_transformers": load[2]},
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
        return
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
