"""The benchmark's peers and reference models, on the same weights as ours: openai-whisper
and transformers (PyTorch), CTranslate2 (faster-whisper's engine); and each system's
forced greedy loop (exactly n tokens, <|endoftext|> never taken). The test suite holds
every forced loop to ours with these."""

from __future__ import annotations

from pathlib import Path

import numpy as np

def converted_weights(model: str) -> tuple[dict[str, np.ndarray], object, Path]:
    """Our converted weights (float32), spec and the CTranslate2 model directory."""
    from maxwhisper.registry import ctranslate2_dir, ensure_converted
    from maxwhisper.weights import load_weights

    path, _, spec = ensure_converted(model)
    return {k: v.astype(np.float32) for k, v in load_weights(path, spec).items()}, spec, ctranslate2_dir(model)


def openai_random_model(spec, seed: int = 0):
    """openai-whisper's `Whisper` of `spec`'s dimensions with its own random
    initialisation, seeded (torch and openai-whisper: benchmark and test dependencies)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**spec.dims)).eval()
    with torch.no_grad():  # left as torch.empty by openai-whisper: uninitialised memory, even NaN
        model.decoder.positional_embedding.normal_(0.0, 0.02)
    return model


def random_weights(spec, seed: int = 0) -> dict[str, np.ndarray]:
    """`openai_random_model`'s weights: the same for every system, for sizes no package
    carries."""
    return {k: v.numpy() for k, v in openai_random_model(spec, seed).state_dict().items()}


def random_model(spec, weights: dict[str, np.ndarray], device: str, precision: str, tokenizer: str | None = None,
                 attention: str = "unfused", greedy_on_device: bool | None = None):
    """Our model on `random_weights`, with `tokenizer` (a tokenizer.json; default: the
    installed package's that fits, English-only or multilingual): the forced workload
    needs only its special tokens."""
    from maxwhisper.model import Whisper
    from maxwhisper.registry import package_files

    if tokenizer is None:
        tokenizer = package_files("base" if spec.vocab.multilingual else "tiny.en")[1]
    return Whisper(spec, weights, tokenizer, device=device, precision=precision, attention=attention,
                   greedy_on_device=greedy_on_device)



def forced_maxwhisper(m, mel: np.ndarray, prompt: list[int], n: int, eot: int) -> np.ndarray:
    rt = m.runtime
    _, ck, cv = rt.encode(mel)[:3]
    logits, state, _ = rt.decode(np.array([prompt] * len(mel)), rt.start(ck, cv), logits_at=[-1])
    if rt.greedy_on_device:  # the whole loop in one call (loop.py), <|endoftext|> masked out
        never = np.zeros(logits.shape[-1], np.float32)
        never[eot] = -np.inf
        return rt.greedy(logits[:, -1], state, never, np.zeros_like(never), n, eot, m.tokenizer.timestamp_begin)[0]
    out = []
    for _ in range(n):
        last = logits[:, -1].copy()
        last[:, eot] = -np.inf
        nxt = np.argmax(last, axis=-1)
        out.append(nxt)
        if len(out) < n:
            logits, state, _ = rt.decode(nxt[:, None], state)
    return np.stack(out, 1)


def forced_openai(model, torch, mel, prompt, n, eot):
    cache, hooks = model.install_kv_cache_hooks()
    try:
        with torch.no_grad():
            features = model.embed_audio(mel)
            tokens = torch.tensor([prompt] * len(mel), device=mel.device)
            logits = model.decoder(tokens, features, kv_cache=cache)[:, -1]
            return _forced_torch(torch, logits, lambda nxt, i: model.decoder(nxt, features, kv_cache=cache)[:, -1],
                                 n, eot)
    finally:
        for h in hooks:
            h.remove()


def _forced_torch(torch, logits, step, n: int, eot: int) -> np.ndarray:
    """The PyTorch peers' forced loop: from the prompt's last logits (B, V), `n` greedy
    tokens with <|endoftext|> never taken; `step(tokens (B, 1), i)` feeds the i-th and
    returns the next logits (B, V)."""
    out = []
    for i in range(n):
        last = logits.clone()
        last[:, eot] = -float("inf")
        nxt = last.argmax(-1, keepdim=True)
        out.append(nxt)
        if len(out) < n:
            logits = step(nxt, i)
    return torch.cat(out, 1).cpu().numpy()


def forced_hf(model, torch, mel, prompt, n, eot):
    with torch.no_grad():
        enc = model.model.encoder(mel)
        out = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([prompt] * len(mel), device=mel.device),
                    use_cache=True)
        cache = out.past_key_values

        def step(nxt, i):
            nonlocal cache
            out = model(encoder_outputs=enc, decoder_input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            return out.logits[:, -1]
        return _forced_torch(torch, out.logits[:, -1], step, n, eot)


def forced_hf_static(m, torch, mel, prompt, n, eot):
    """forced_hf with transformers' static KV cache (fixed shapes every step) and the
    decoder step under torch.compile: `m` is (model, compiled model, caches). One cache
    per shape, reset between runs: CUDA graphs replay on the same memory."""
    from transformers import EncoderDecoderCache, StaticCache

    model, step, caches = m
    p = len(prompt)
    with torch.no_grad():
        enc = model.model.encoder(mel)
        key = (len(mel), p + n, enc.last_hidden_state.shape[1])
        if key not in caches:
            caches[key] = EncoderDecoderCache(StaticCache(model.config, max_cache_len=key[1]),
                                              StaticCache(model.config, max_cache_len=key[2]))
        cache = caches[key]
        cache.reset()
        out = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([prompt] * len(mel), device=mel.device),
                    past_key_values=cache, cache_position=torch.arange(p, device=mel.device), use_cache=True)
        return _forced_torch(torch, out.logits[:, -1], lambda nxt, i: step(
            encoder_outputs=enc, decoder_input_ids=nxt, past_key_values=cache,
            cache_position=torch.tensor([p + i], device=mel.device), use_cache=True).logits[:, -1], n, eot)


def forced_ct2(model, ct2, mel, prompt, n, eot):
    # CTranslate2 4.x generates max_length / 2 tokens for Whisper (measured); the token
    # count is checked after the run.
    res = model.generate(ct2.StorageView.from_array(mel), [prompt] * len(mel), beam_size=1, max_length=2 * n,
                         suppress_tokens=[eot], suppress_blank=False)
    return np.array([r.sequences_ids[0] for r in res])


# --- peers -------------------------------------------------------------------------------

def _on(model, torch, device: str):
    """A PyTorch peer where ours runs: the CPU in float32, or CUDA in float16 (the
    precision openai-whisper and transformers use on GPUs)."""
    return model.to("cuda").half() if device == "gpu" else model


def torch_input(torch, mel: np.ndarray, device: str):
    x = torch.from_numpy(mel)
    return x.to("cuda").half() if device == "gpu" else x


def openai_model(weights, spec, device: str = "cpu"):
    import torch
    from whisper.model import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**spec.dims)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return _on(model, torch, device), torch


def hf_model(weights, spec, device: str = "cpu"):
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from maxwhisper.convert.huggingface import CONFIG_DIMS, rename

    d = spec.dims
    config = WhisperConfig(**{hf: d[ours] for hf, ours in CONFIG_DIMS.items()}, encoder_ffn_dim=4 * d["n_audio_state"],
                           decoder_ffn_dim=4 * d["n_text_state"], attn_implementation="sdpa")
    model = WhisperForConditionalGeneration(config).eval()
    state = {}
    for name in model.state_dict():
        ours = rename(name)
        state[name] = torch.from_numpy(weights[ours if ours else "decoder.token_embedding.weight"])
    model.load_state_dict(state)
    return _on(model, torch, device), torch


def hf_compiled_model(weights, spec, device: str, mel: np.ndarray, prompt, n: int, eot: int):
    """transformers' model and its torch.compile'd forward (CUDA graphs on a GPU: mode
    reduce-overhead), compiled here by one forced run on `mel`, so that the load column
    holds the compile, as ours holds MAX's."""
    model, torch = hf_model(weights, spec, device)
    compiled = (model, torch.compile(model, mode="reduce-overhead" if device == "gpu" else None), {})
    forced_hf_static(compiled, torch, torch_input(torch, mel, device), prompt, n, eot)
    return compiled, torch


def ct2_model(directory: Path, compute_type, threads):
    import ctranslate2

    return ctranslate2.models.Whisper(str(directory), device="cpu", compute_type=compute_type,
                                      intra_threads=threads), ctranslate2


