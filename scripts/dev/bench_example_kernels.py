"""The bing_bert example's own kernels against the plain PyTorch ops they replace, forward and
forward+backward, one GPU: the fused residual add + dropout + LayerNorm
(``examples/bing_bert/residual_norm.py``) and the masked-LM cross-entropy
(``examples/bing_bert/cross_entropy.py``).

    python3 scripts/dev/bench_example_kernels.py      # BERT-base and -large rows at 4096 x32
    python3 scripts/dev/bench_example_kernels.py --rows 131072 --hidden 768 --p 0.1

Each kernel is checked against the plain ops first (the outputs and gradients must agree to
bf16 rounding; without dropout for the LayerNorm), then timed with ``triton.testing.do_bench``.
The bandwidth column counts the bytes the fused kernels must move (LayerNorm forward: read
residual and h, write s and the normalized output; backward: read the two upstream gradients
and s, write the two input gradients. Loss: read the logits forward, read them and write
their gradient backward).
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples", "bing_bert")]

import cross_entropy as ce  # noqa: E402
import residual_norm as rn  # noqa: E402


def plain(residual, h, drop, norm):
    s = residual + drop(h)
    return s, norm(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[131072, 65536])
    ap.add_argument("--hidden", type=int, nargs="+", default=[768, 1024])
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--masked", type=int, nargs="+", default=[19661, 9830],
                    help="masked tokens of the loss rows (15%% of 4096 x32 and x16)")
    ap.add_argument("--vocab", type=int, default=30522)
    args = ap.parse_args()
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    print(f"device {torch.cuda.get_device_name()}, {args.dtype}, dropout {args.p}")
    print("| rows x hidden | variant | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, n in zip(args.rows, args.hidden):
        norm = torch.nn.LayerNorm(n, eps=1e-12).to("cuda", dtype)
        drop = torch.nn.Dropout(args.p)
        residual, h = (torch.randn(rows, n, device="cuda", dtype=dtype, requires_grad=True)
                       for _ in range(2))
        ds, dy = (torch.randn(rows, n, device="cuda", dtype=dtype) for _ in range(2))

        def run(name, p):
            if name == "plain":
                drop.p = p
                return plain(residual, h, drop, norm)
            return rn.fused_add_dropout_norm(residual, h, p, norm.weight, norm.bias, 1e-12)

        leaves = (residual, h, norm.weight, norm.bias)
        got = {name: run(name, 0.0) for name in ("plain", "fused")}
        for (a, b) in zip(got["fused"] + torch.autograd.grad(got["fused"], leaves, (ds, dy)),
                          got["plain"] + torch.autograd.grad(got["plain"], leaves, (ds, dy))):
            err = (a.float() - b.float()).abs().max().item() / (
                b.float().abs().max().item() + 1e-6)
            assert err < 3e-2, f"fused and plain disagree without dropout: {err:.2e}"
        unit = rows * n * residual.element_size()
        for name in ("plain", "fused"):
            fwd = do_bench(lambda: run(name, args.p), warmup=10, rep=50)

            def step():
                torch.autograd.backward(run(name, args.p), (ds, dy))

            both = do_bench(step, warmup=10, rep=50, grad_to_none=list(leaves))
            print(f"| {rows} x {n} | {name} | {fwd:.3f} | {both:.3f} | "
                  f"{4 * unit / fwd / 1e6:.0f} | {9 * unit / both / 1e6:.0f} |")
    for rows in args.masked:
        scores = (4 * torch.randn(rows, args.vocab, device="cuda")).to(dtype).requires_grad_()
        labels = torch.randint(0, args.vocab, (rows,), device="cuda")
        losses = {"plain": lambda: torch.nn.functional.cross_entropy(scores.float(), labels),
                  "fused": lambda: ce.fused_cross_entropy(scores, labels)}
        got = {name: fn() for name, fn in losses.items()}
        grads = {name: torch.autograd.grad(loss, scores)[0] for name, loss in got.items()}
        assert abs(got["fused"].item() - got["plain"].item()) < 1e-3 * got["plain"].item()
        err = (grads["fused"].float() - grads["plain"].float()).abs().max().item()
        assert err < 2e-2 * grads["plain"].float().abs().max().item(), err
        unit = rows * args.vocab * scores.element_size()
        for name, fn in losses.items():
            fwd = do_bench(fn, warmup=10, rep=50)
            both = do_bench(lambda: fn().backward(), warmup=10, rep=50, grad_to_none=[scores])
            print(f"| loss {rows} x {args.vocab} | {name} | {fwd:.3f} | {both:.3f} | "
                  f"{unit / fwd / 1e6:.0f} | {3 * unit / both / 1e6:.0f} |")


if __name__ == "__main__":
    main()
