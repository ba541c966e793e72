"""Sample from a model: `python -m haillm.tools.generate CHECKPOINT_OR_HF_DIR --prompt TEXT [--max-new-tokens N]
[--greedy | --temperature T --top-p P] [--seed S] [--tokenizer SPEC] [--device cuda] [--ema]`.

CHECKPOINT_OR_HF_DIR is a training checkpoint (`checkpoints/step_<N>`, any layout; its tokenizer is the run's
`data.tokenizer`) or a Hugging Face DeepseekV3 directory (its `tokenizer.json` when there is one, else
`--tokenizer`); `--ema` samples from a training checkpoint's EMA of the parameters (`train.ema_decay`).
Decoding runs MLA's latent cache (`DeepSeekV3.forward_inference`: per layer and token only the compressed
latent and the rotary key are kept) and stops at the tokenizer's end-of-document id or after
`--max-new-tokens`. `--greedy` takes the most likely token; otherwise tokens are sampled at `--temperature`
from the smallest set whose probability reaches `--top-p`. Prints the prompt and its continuation. Bad input:
one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from haillm.data import DataError
from haillm.data.tokenizer import Tokenizer, build_tokenizer
from haillm.models.deepseek_v3.model import DeepSeekV3
from haillm.tools.export import ExportError, config_path, load_checkpoint_model
from haillm.train.checkpoint import MANIFEST


def load_model(path: str | Path, tokenizer: str | None = None, ema: bool = False) -> tuple[DeepSeekV3, Tokenizer]:
    """The model and tokenizer of a training checkpoint (with ``ema``: its EMA of the parameters) or a Hugging
    Face directory."""
    path = Path(path)
    if ema and not (path / MANIFEST).is_file():
        raise ExportError(f"--ema reads a training checkpoint's EMA of the parameters; {path} is not a training "
                          f"checkpoint (no {MANIFEST})")
    if (path / MANIFEST).is_file():
        model = load_checkpoint_model(path, ema)
        spec = tokenizer or OmegaConf.load(config_path(path)).data.tokenizer
    elif (path / "config.json").is_file():
        from haillm.models.deepseek_v3.hf import load_hf

        model = load_hf(path)
        spec = tokenizer or (str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else "byte")
    else:
        raise ExportError(f"{path} is neither a training checkpoint (no {MANIFEST}) nor a Hugging Face directory "
                          "(no config.json)")
    return model.eval(), build_tokenizer(spec)


@torch.no_grad()
def generate(model: DeepSeekV3, prompt: list[int], max_new_tokens: int, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, stop_id: int | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """The tokens that follow `prompt`, decoded with the latent cache, up to `max_new_tokens` or `stop_id`."""
    total = len(prompt) + max_new_tokens
    if not prompt or total > model.args.max_seq_len:
        raise ValueError(f"the prompt ({len(prompt)} tokens) and --max-new-tokens={max_new_tokens} must fit "
                         f"model.max_seq_len={model.args.max_seq_len} and the prompt must not be empty")
    device = model.embed.weight.device
    cache = model.new_inference_cache(1, total)
    logits = model.forward_inference(torch.tensor([prompt], device=device), 0, cache)[0, -1]
    out: list[int] = []
    for position in range(len(prompt), total):
        token = _pick(logits.float(), greedy, temperature, top_p, generator)
        if token == stop_id:
            break
        out.append(token)
        if position + 1 < total:
            logits = model.forward_inference(torch.tensor([[token]], device=device), position, cache)[0, -1]
    return out


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> int:
    if greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    keep = order[: int((cumulative < top_p).sum()) + 1]  # the smallest set reaching top_p
    kept = probs[keep] / probs[keep].sum()
    return int(keep[torch.multinomial(kept.cpu(), 1, generator=generator)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m haillm.tools.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a checkpoints/step_<N> directory or a Hugging Face DeepseekV3 directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="the most likely token at each step")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0, help="for sampling")
    parser.add_argument("--tokenizer", help="byte or a tokenizer.json (default: the model's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--ema", action="store_true", help="the checkpoint's EMA of the parameters (train.ema_decay)")
    args = parser.parse_args(argv)
    problems = [f"--max-new-tokens={args.max_new_tokens} must be >= 1"] if args.max_new_tokens < 1 else []
    problems += [f"--temperature={args.temperature} must be > 0"] if not args.temperature > 0 else []
    problems += [f"--top-p={args.top_p} must be in (0, 1]"] if not 0 < args.top_p <= 1 else []
    if problems:
        parser.exit(2, f"{parser.prog}: error: {problems[0]}\n")
    try:
        model, tokenizer = load_model(args.model, args.tokenizer, args.ema)
        model.to(args.device)
        prompt = tokenizer.encode(args.prompt)
        tokens = generate(model, prompt, args.max_new_tokens, args.greedy, args.temperature, args.top_p,
                          tokenizer.eod_id, torch.Generator().manual_seed(args.seed))
    except (ExportError, DataError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
