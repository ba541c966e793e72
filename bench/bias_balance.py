"""Does the auxiliary-loss-free bias update balance expert load? (issue 3, acceptance 3)

Trains the ``tiny`` preset on random-token batches twice from the same seed and data, once with
``gamma = 0`` and once with ``gamma = 0.001`` (the V3 value), and prints ``max_vio`` (max over MoE layers of
(max load - mean load) / mean load) of the loads summed over the last ``--window`` steps, plus the last step's.

Tokens come from a random sparse Markov chain by default (each token has 4 random successors), so that, as in
text, the next token depends on the current one and hidden states carry per-token information for the gate.
With ``--dist uniform`` (pure noise) the model can only learn the unigram distribution, its hidden states
become alike for all tokens and at lr 1e-3 routing collapses onto two experts whatever gamma is.

    python bench/bias_balance.py --steps 200 --gamma 0.001
"""

import argparse
import time

import torch

from haillm.models.deepseek_v3 import DeepSeekV3, get_preset, max_violation


def sample_tokens(gen: torch.Generator, successors: torch.Tensor, shape: tuple[int, int], dist: str) -> torch.Tensor:
    vocab = successors.shape[0]
    if dist == "uniform":
        return torch.randint(0, vocab, shape, generator=gen)
    tokens = torch.empty(shape, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (shape[0],), generator=gen)
    for t in range(1, shape[1]):
        pick = torch.randint(0, successors.shape[1], (shape[0],), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    return tokens


def run(gamma: float, steps: int, window: int, dist: str, seed: int, batch: int, seq_len: int) -> tuple[float, float]:
    args = get_preset("tiny")
    model = DeepSeekV3(args, init_seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, args.vocab_size, (args.vocab_size, 4), generator=gen)
    window_loads = torch.zeros_like(model.moe_loads())
    for step in range(steps):
        model.reset_moe_loads()
        loss = model.compute_loss(sample_tokens(gen, successors, (batch, seq_len + 1), dist))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loads = model.moe_loads()
        model.update_gate_bias(loads, gamma)
        if step >= steps - window:
            window_loads += loads
    return max_violation(window_loads), max_violation(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gamma", type=float, default=0.001)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--dist", choices=["markov", "uniform"], default="markov")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print(f"tiny, {opts.steps} steps of {opts.batch}x{opts.seq_len} {opts.dist} random tokens, AdamW lr 1e-3")
    for gamma in (0.0, opts.gamma):
        start = time.perf_counter()
        window_vio, last_vio = run(gamma, opts.steps, opts.window, opts.dist, opts.seed, opts.batch, opts.seq_len)
        print(
            f"gamma={gamma:<7g} max_vio(last {opts.window} steps)={window_vio:.3f}  max_vio(last step)={last_vio:.3f}"
            f"  ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
