"""llama.cpp on the same random weights as our own decoding: write a Qwen2 text model as GGUF, time it, check it.

    python llamacpp.py --shape tiny            # hidden 256, 2 layers, vocab 2048
    python llamacpp.py --shape 0.5b            # Qwen2-0.5B's text shape (~2 GB of float32 weights in memory)

llama-cpp-python is built here from its source package, for this CPU (no GitHub needed, only the registry):

    CMAKE_ARGS="-DGGML_NATIVE=ON" nice -n 19 pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36

f16 files are written directly (2-D weights f16, norms and biases f32, as convert_hf_to_gguf.py does). q8_0 and
q4_0 files are written as f32 and then quantized by llama.cpp's own `llama_model_quantize` (llama-quantize), so
its per-tensor choices apply: at q8_0 everything 2-D is Q8_0; at q4_0 the output matrix (or, with tied
embeddings, token_embd) becomes Q6_K, which falls back to Q8_0 when the row length is not a multiple of 256
(Qwen2-0.5B's 896), and the other token_embd stays Q4_0. Qwen2's q/k weights need no permutation (llama.cpp
uses NeoX rope for qwen2, the same rotate-half layout as transformers). The vocabulary is a placeholder:
benchmarks feed token ids, never text.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's C log goes through this logger

FTYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: each of the 256 bytes as the printable character byte-level BPE uses."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def _write_vocab(writer: gguf.GGUFWriter, n: int) -> None:
    """A gpt2-type vocabulary of n tokens: 256 bytes, one merge ("Ġ Ġ"), the rest control tokens."""
    tokens = _byte_tokens() + ["ĠĠ"] + [f"<|t{i}|>" for i in range(n - 257)]
    types = [gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * (n - 257)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_eos_token_id(n - 1)


def _write_hparams(writer: gguf.GGUFWriter, config, ftype: gguf.LlamaFileType) -> None:
    """The qwen2 keys convert_hf_to_gguf.py writes for a Qwen2ForCausalLM without rope scaling."""
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(ftype)


def _write(state_dict: dict[str, torch.Tensor], config, path: Path, ftype: gguf.LlamaFileType) -> None:
    """One GGUF file: 2-D weights in f16 (MOSTLY_F16) or f32 (ALL_F32), 1-D tensors in f32."""
    matrix = np.float16 if ftype == gguf.LlamaFileType.MOSTLY_F16 else np.float32
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    _write_hparams(writer, config, ftype)
    _write_vocab(writer, config.vocab_size)
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads token_embd for the output when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no qwen2 GGUF name for {key}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        writer.add_tensor(name, data.astype(matrix) if data.ndim == 2 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize(source: Path, path: Path, kind: str) -> None:
    """llama-quantize's default mixture for `kind`, no importance matrix."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPES[kind])
    if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed: {source} -> {path} ({kind})")


def write_gguf(state_dict: dict[str, torch.Tensor], config, path: str | Path, kind: str) -> Path:
    """Write a Qwen2ForCausalLM state dict as a qwen2 GGUF file of `kind` (f16, q8_0, q4_0) at `path`."""
    path = Path(path)
    if kind == "f16":
        _write(state_dict, config, path, gguf.LlamaFileType.MOSTLY_F16)
        return path
    source = path.with_name(path.name + ".f32")
    _write(state_dict, config, source, gguf.LlamaFileType.ALL_F32)
    try:
        _quantize(source, path, kind)
    finally:
        source.unlink()
    return path


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {"F32": 121, "Q4_0": 168, "Q8_0": 1}."""
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def _load(path: str | Path, *, n_ctx: int, n_batch: int, threads: int, flash_attn: bool) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                           n_threads_batch=threads, flash_attn=flash_attn, logits_all=False, verbose=False)


def _logits(llm: llama_cpp.Llama) -> np.ndarray:
    """The last evaluated position's logits (a view into llama.cpp's buffer)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def _greedy(llm: llama_cpp.Llama, n: int) -> list[int]:
    """n greedy tokens after what llm has evaluated, each evaluated in turn (n single-token decode steps)."""
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(np.argmax(_logits(llm))))
        llm.eval(tokens[-1:])
    return tokens


def _prompt(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


def measure(path: str | Path, *, prompt_tokens: int, new_tokens: int, threads: int, repeats: int = 3,
            flash_attn: bool = False) -> dict:
    """llama.cpp's prompt and greedy decode speed on a random prompt, best of `repeats` (tokens/s)."""
    llm = _load(path, n_ctx=prompt_tokens + new_tokens, n_batch=prompt_tokens, threads=threads,
                flash_attn=flash_attn)
    prompt = _prompt(prompt_tokens, llm.n_vocab())
    prompt_s = decode_s = float("inf")
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        middle = time.perf_counter()
        _greedy(llm, new_tokens)
        prompt_s, decode_s = min(prompt_s, middle - start), min(decode_s, time.perf_counter() - middle)
    llm.close()
    file_type = gguf.LlamaFileType(gguf.GGUFReader(path).get_field(gguf.Keys.General.FILE_TYPE).contents())
    return {"prompt_tok_s": prompt_tokens / prompt_s, "decode_tok_s": new_tokens / decode_s,
            "bytes": Path(path).stat().st_size, "kind": file_type.name.removeprefix("MOSTLY_").lower()}


@torch.no_grad()
def _reference(state_dict: dict[str, torch.Tensor], config, prompt: list[int],
               n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' float32 greedy tokens (full recompute each step) and its first-step logits."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    ids, first = list(prompt), None
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        first = logits if first is None else first
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], first


def agrees(path: str | Path, state_dict: dict[str, torch.Tensor], config, *, prompt_tokens: int = 16,
           new_tokens: int = 16, threads: int = 2) -> dict:
    """Does llama.cpp's file decode like transformers' Qwen2ForCausalLM on the same weights (float32)?

    Returns how many leading greedy tokens agree (f16 rounding may flip a near-tie later on), the first step's
    top-1 logit difference (at transformers' top token) and its largest logit difference over the vocabulary.
    """
    prompt = _prompt(prompt_tokens, config.vocab_size, seed=1)
    ref_tokens, ref_first = _reference(state_dict, config, prompt, new_tokens)
    llm = _load(path, n_ctx=prompt_tokens + new_tokens, n_batch=prompt_tokens, threads=threads, flash_attn=False)
    llm.eval(prompt)
    first = torch.from_numpy(_logits(llm).copy())
    tokens = _greedy(llm, new_tokens)
    llm.close()
    leading = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), new_tokens)
    top = int(ref_first.argmax())
    return {"agreeing": leading, "of": new_tokens, "distinct_tokens": len(set(ref_tokens)),
            "top1_logit_diff": abs(float(first[top] - ref_first[top])),
            "max_logit_diff": float((first - ref_first).abs().max())}


SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=32768),
}


def random_qwen2(shape: str, seed: int = 0):
    """(config, float32 state dict) of a random Qwen2ForCausalLM; norms and biases random too, so both are checked."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**SHAPES[shape], initializer_range=0.05)
    state_dict = Qwen2ForCausalLM(config).eval().state_dict()
    for key, tensor in state_dict.items():
        if tensor.ndim == 1:
            tensor.normal_(1.0 if key.endswith("norm.weight") else 0.0, 0.1)
    return config, state_dict


def main() -> None:
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES))
    parser.add_argument("--prompt-tokens", type=int, default=411)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flash-attn", action="store_true", help="llama-cpp-python's default is off")
    args = parser.parse_args()
    config, state_dict = random_qwen2(args.shape)
    report: dict = {"shape": args.shape, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens, "flash_attn": args.flash_attn, "runs": []}
    with tempfile.TemporaryDirectory() as folder:
        for kind in FTYPES:
            path = write_gguf(state_dict, config, Path(folder) / f"{args.shape}-{kind}.gguf", kind)
            if kind == "f16":
                report["agreement_f16"] = agrees(path, state_dict, config, threads=args.threads)
            run = measure(path, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
                          repeats=args.repeats, flash_attn=args.flash_attn)
            report["runs"].append(run | {"tensor_types": tensor_types(path)})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
