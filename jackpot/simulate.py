"""Numerical OBRS study: the paper's Figure 2 on synthetic distributions, plus a budget sweep.

Protocol (METHOD.md §8; the paper does not give its own):
    p_tgt = softmax(z),           z ~ N(0, s^2) per state, s alternating over {2, 3}
    p_inf = softmax(z + sigma*xi) with xi ~ LogNormal(0, 1)  ("lognormal": the rollout model
                                  over-weights a few tokens) or xi ~ N(0, 1)  ("gaussian")
For each sigma of a geometric grid, and a fixed lam (default 1), every state gets
Z = sum_x min(p_inf, p_tgt/lam) (= its acceptance rate), KL(p_tgt || p_inf) and
KL(p_tgt || p'_inf) with p'_inf = min(p_inf, p_tgt/lam)/Z; each grid point reports the mean of the
three over the states (so its reduction is a ratio of means). The same (z, xi) draws serve every
sigma, and the mean KL before is increasing in sigma (each state's KL is convex in sigma with its
minimum at 0), so the grid ends (KL 1e-4 and 1) and the anchor points (KL 0.001 and 0.009, where
the paper reads acceptance ~0.987 and ~0.955) are solved for by regula falsi on log sigma.

Beyond the paper: a budget sweep on one (p_tgt, p_inf) pair, lam = lambda_for_budget(budget),
tracing KL after against acceptance from no rejection (budget 1, KL unchanged) to classic rejection
sampling (lam = max ratio, KL 0, acceptance 1/max ratio).

At the defaults (V = 32000, 64 states, seed 0) the lognormal family at KL before 0.009 accepts 0.961
and cuts the KL 16x (seeds 1-3: 17-19x; METHOD.md quotes 13-14x, the paper ~12x); the gaussian
family accepts 0.947 and cuts it 2.8x. The ratio of means is sensitive to the heavy tail of xi.

Outputs: DIR/simulation.json, DIR/simulation.png (toy, acceptance, KL), DIR/budget_sweep.png.
Run: `jackpot simulate --out runs/simulate`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from jackpot.core.obrs import acceptance_prob, lambda_for_budget, normalizer, obrs_kl_from_logits
from jackpot.errors import InputError
from jackpot.fileio import write_atomic

SCALES = (2.0, 3.0)  # std of the target logits, alternating over the states
KL_SPAN = (1e-4, 1.0)  # the sigma grid makes the mean KL before span this range
ANCHOR_KLS = (1e-3, 9e-3)  # extra grid points, solved exactly, where the paper quotes acceptance
PAPER_FIG2B = ((1e-3, 0.987), (9e-3, 0.955))  # (KL before, acceptance) read off the paper's Fig. 2b
PAPER_REDUCTION = 12.0  # "KL after OBRS ~12x lower" (Fig. 2c)
GOAL = {"family": "lognormal", "kl_before": 9e-3, "min_acceptance": 0.95, "min_reduction": 10.0}
TOY_P_INF = (0.45, 0.30, 0.15, 0.10)
TOY_P_TGT = (0.25, 0.35, 0.25, 0.15)
SWEEP_KL = 0.05  # KL before of the budget-sweep pair (lognormal family)
SWEEP_BUDGET_MIN = 0.5
SOLVE_BRACKET = (1e-4, 10.0)  # sigma bracket of solve_sigma
SOLVE_RTOL = 1e-3  # solve_sigma stops at |log KL - log target| < SOLVE_RTOL ...
SOLVE_XTOL = 1e-6  # ... or when the bracket on log sigma is this narrow (float32 noise of a tiny KL)
SOLVE_MAX_ITERS = 60
KL_NOISE_FLOOR = 1e-6  # KL values below this are float32 rounding of the closed form (not drawn on log axes)
KL_FLOOR = 1e-30  # float32 rounding can make a tiny KL <= 0; floored before the log


FAMILIES = ("lognormal", "gaussian")


def _draw_noise(family: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    xi = torch.randn(shape, generator=gen, dtype=torch.float64)
    if family == "lognormal":
        return xi.exp()
    if family == "gaussian":
        return xi
    raise InputError(f"unknown perturbation family {family!r}")


def draw_states(vocab: int, states: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Target logits z (states, vocab) and one noise draw xi (states, vocab) per family.

    Drawn in float64 and stored in float32, the precision obrs_kl_from_logits computes in anyway.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([SCALES[i % len(SCALES)] for i in range(states)], dtype=torch.float64)
    z = torch.randn((states, vocab), generator=gen, dtype=torch.float64) * scale.unsqueeze(-1)
    return z.float(), {f: _draw_noise(f, (states, vocab), gen).float() for f in FAMILIES}


def evaluate(z: torch.Tensor, xi: torch.Tensor, sigma: float, lam: float) -> dict[str, float]:
    """One grid point: means over the states of KL before, KL after and acceptance Z."""
    acc, kl_before, kl_after = obrs_kl_from_logits(z, z + sigma * xi, lam)
    return {"sigma": sigma, "kl_before": kl_before.mean().item(), "kl_after": kl_after.mean().item(),
            "acceptance": acc.mean().item()}


def _mean_kl_before(z: torch.Tensor, xi: torch.Tensor, log_sigma: float) -> float:
    _, kl, _ = obrs_kl_from_logits(z, z + math.exp(log_sigma) * xi, 1.0)
    return kl.mean().item()


def solve_sigma(z: torch.Tensor, xi: torch.Tensor, target_kl: float,
                bracket: tuple[float, float] = SOLVE_BRACKET) -> float:
    """sigma whose mean KL(p_tgt || p_inf) equals target_kl (to a relative SOLVE_RTOL).

    Regula falsi with the Illinois fix on f(log sigma) = log KL - log target, which is increasing
    and nearly linear (KL ~ sigma^2 for small sigma); a handful of evaluations instead of ~30.
    """
    def f(u: float) -> float:
        return math.log(max(_mean_kl_before(z, xi, u), KL_FLOOR)) - math.log(target_kl)

    a, b = (math.log(s) for s in bracket)
    fa, fb = f(a), f(b)
    if fa > 0 or fb < 0:
        raise InputError(f"KL {target_kl} is outside KL(sigma) for sigma in {bracket}")
    side, c = 0, a
    for _ in range(SOLVE_MAX_ITERS):
        c = (a * fb - b * fa) / (fb - fa)
        fc = f(c)
        if abs(fc) < SOLVE_RTOL or b - a < SOLVE_XTOL:
            break
        if fc > 0:
            b, fb = c, fc
            fa, side = (fa / 2, -1) if side == -1 else (fa, -1)
        else:
            a, fa = c, fc
            fb, side = (fb / 2, 1) if side == 1 else (fb, 1)
    return math.exp(c)


def run_family(z: torch.Tensor, xi: torch.Tensor, n_sigma: int, lam: float) -> tuple[list[dict], list[dict]]:
    """Grid points (sorted by sigma, anchors included) and the anchor points with their targets."""
    s_lo, s_hi = (solve_sigma(z, xi, kl) for kl in KL_SPAN)
    step = (math.log(s_hi) - math.log(s_lo)) / max(n_sigma - 1, 1)
    grid = [math.exp(math.log(s_lo) + i * step) for i in range(n_sigma)]
    anchor_sigmas = [solve_sigma(z, xi, kl, (s_lo, s_hi)) for kl in ANCHOR_KLS]
    points = [evaluate(z, xi, s, lam) for s in sorted(grid + anchor_sigmas)]
    anchors = []
    for kl, s in zip(ANCHOR_KLS, anchor_sigmas, strict=True):
        p = next(p for p in points if p["sigma"] == s)
        anchors.append({"target_kl_before": kl, **p, "reduction": _reduction(p),
                        "by_scale": _by_scale(z, xi, s, lam)})
    return points, anchors


def _by_scale(z: torch.Tensor, xi: torch.Tensor, sigma: float, lam: float) -> dict[str, dict]:
    """The same point restricted to the states of each target-logit scale s (rows i % len(SCALES))."""
    out = {}
    for i, scale in enumerate(SCALES):
        if i < z.shape[0]:
            p = evaluate(z[i::len(SCALES)], xi[i::len(SCALES)], sigma, lam)
            out[f"{scale:g}"] = {"kl_before": p["kl_before"], "kl_after": p["kl_after"],
                                 "acceptance": p["acceptance"], "reduction": _reduction(p)}
    return out


def _reduction(point: dict) -> float | None:
    """KL before / KL after (None when OBRS removed the mismatch entirely)."""
    return point["kl_before"] / point["kl_after"] if point["kl_after"] > 0 else None


def _fmt_reduction(r: float | None) -> str:
    return "KL after = 0" if r is None else f"{r:.1f}x"


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def toy(lam: float) -> dict:
    """4-token example: p'_inf = p_inf * a / Z moves p_inf onto p_tgt (Fig. 2a)."""
    p_inf = torch.tensor(TOY_P_INF, dtype=torch.float64)
    p_tgt = torch.tensor(TOY_P_TGT, dtype=torch.float64)
    a = acceptance_prob(p_tgt.log(), p_inf.log(), lam)
    z = normalizer(p_tgt.log(), p_inf.log(), lam)
    p_after = p_inf * a / z
    return {"lambda": lam, "p_inf": p_inf.tolist(), "p_tgt": p_tgt.tolist(), "p_inf_after": p_after.tolist(),
            "accept_prob": a.tolist(), "acceptance": float(z),
            "kl_before": _kl(p_tgt, p_inf), "kl_after": _kl(p_tgt, p_after)}


def _sweep_point(z: torch.Tensor, zr: torch.Tensor, budget: float | None, lam: float) -> dict:
    acc, _, kl_after = obrs_kl_from_logits(z, zr, lam)
    return {"budget": budget, "lambda": lam, "acceptance": acc.item(), "kl_after": max(kl_after.item(), 0.0)}


def budget_sweep(z: torch.Tensor, xi: torch.Tensor, n_budgets: int) -> dict:
    """KL after vs acceptance on one pair (z, xi: (1, V)) as the budget goes from ~0.5 to 1."""
    sigma = solve_sigma(z, xi, SWEEP_KL)
    zr = z + sigma * xi
    logp_t, logp_r = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    _, kl_before, _ = obrs_kl_from_logits(z, zr, 1.0)
    r_max = (logp_t - logp_r).max().exp().item()
    # budgets: an even grid from SWEEP_BUDGET_MIN, densified between classic rejection and 1
    lo = min(SWEEP_BUDGET_MIN, 1.0 / r_max)
    steps = [i / (n_budgets - 1) for i in range(n_budgets)]
    budgets = sorted({round(lo + (1 - lo) * t, 6) for t in steps} | {round(1 / r_max + (1 - 1 / r_max) * t, 6)
                                                                     for t in steps})
    points = [_sweep_point(z, zr, b, lambda_for_budget(logp_t, logp_r, b).item()) for b in budgets]
    classic = _sweep_point(z, zr, None, r_max)
    return {"family": "lognormal", "scale": SCALES[0], "vocab": z.shape[-1], "sigma": sigma,
            "kl_before": kl_before.item(),
            "points": points, "no_rejection": {"acceptance": 1.0, "kl_after": kl_before.item()},
            "classic": {**classic, "budget": 1.0 / r_max}, "lam_one": _sweep_point(z, zr, None, 1.0),
            "max_budget_error": max(abs(p["acceptance"] - p["budget"]) for p in points)}


def simulate(vocab: int, states: int, n_sigma: int, lam: float, seed: int, n_budgets: int) -> dict:
    """The whole study as a JSON-ready dict."""
    z, noise = draw_states(vocab, states, seed)
    families, anchors = {}, {}
    for family in FAMILIES:
        families[family], anchors[family] = run_family(z, noise[family], n_sigma, lam)
    sweep = budget_sweep(z[:1], noise["lognormal"][:1], n_budgets)
    goal = next(a for a in anchors[GOAL["family"]] if a["target_kl_before"] == GOAL["kl_before"])
    reduction = math.inf if goal["reduction"] is None else goal["reduction"]
    passed = goal["acceptance"] >= GOAL["min_acceptance"] and reduction >= GOAL["min_reduction"]
    return {
        "vocab": vocab, "lambda": lam, "families": families, "anchors": anchors,
        "goal": {**GOAL, "acceptance": goal["acceptance"], "reduction": goal["reduction"], "passed": passed},
        "toy": toy(lam), "budget_sweep": sweep,
        "protocol": {"states": states, "scales": list(SCALES), "seed": seed, "n_sigma": n_sigma,
                     "kl_span": list(KL_SPAN), "anchor_kls": list(ANCHOR_KLS),
                     "aggregate": "mean over states of KL before, KL after and acceptance",
                     "perturbations": {"lognormal": "xi ~ LogNormal(0, 1)", "gaussian": "xi ~ N(0, 1)"}},
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"OBRS on synthetic states: V={result['vocab']}, lambda={result['lambda']}")
    for col in ("family", "sigma", "KL before", "KL after", "reduction", "acceptance"):
        table.add_column(col, justify="right")
    for family, points in result["families"].items():
        anchor_sigmas = {a["sigma"] for a in result["anchors"][family]}
        for p in points:
            style = "bold" if p["sigma"] in anchor_sigmas else None
            table.add_row(family, f"{p['sigma']:.4g}", f"{p['kl_before']:.3e}", f"{p['kl_after']:.3e}",
                          _fmt_reduction(_reduction(p)), f"{p['acceptance']:.4f}", style=style)
    console = Console()
    console.print(table)
    for family, anchors in result["anchors"].items():
        for a in anchors:
            per_scale = ", ".join(f"s={k} {_fmt_reduction(v['reduction'])}" for k, v in a["by_scale"].items())
            console.print(f"{family} KL {a['kl_before']:.4f}: acceptance {a['acceptance']:.4f}, "
                          f"reduction {_fmt_reduction(a['reduction'])} ({per_scale})")
    g, s = result["goal"], result["budget_sweep"]
    verdict = "[green]PASS[/green]" if g["passed"] else "[red]FAIL[/red]"
    console.print(f"goal ({g['family']} at KL {g['kl_before']}: acceptance >= {g['min_acceptance']}, "
                  f"reduction >= {g['min_reduction']}x): {verdict}")
    console.print(f"budget sweep (KL {s['kl_before']:.3f}): classic rejection accepts "
                  f"{s['classic']['acceptance']:.3f}, lam=1 {s['lam_one']['acceptance']:.3f}")


def _plot_toy(ax, t: dict) -> None:
    x = range(len(t["p_inf"]))
    bars = (("p_inf", "p_inf"), ("p_tgt", "p_tgt"), ("p_inf_after", "p'_inf (OBRS)"))
    for i, (key, label) in enumerate(bars):
        ax.bar([j + (i - 1) * 0.27 for j in x], t[key], width=0.27, label=label)
    ax.set_xticks(list(x), [f"token {j}" for j in x])
    ax.set_ylabel("probability")
    ax.set_title(f"(a) toy, lambda={t['lambda']:g}: KL {t['kl_before']:.3f} -> {t['kl_after']:.3f}, "
                 f"Z={t['acceptance']:.2f}", fontsize=9)
    ax.legend(fontsize=8)


def plot_main(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(16, 4.6))
    _plot_toy(ax_a, result["toy"])
    for family, points in result["families"].items():
        kb = [p["kl_before"] for p in points]
        ax_b.plot(kb, [p["acceptance"] for p in points], "o-", ms=3, label=family)
        ax_c.plot(kb, [p["kl_after"] for p in points], "o-", ms=3, label=family)
    ax_b.plot(*zip(*PAPER_FIG2B, strict=True), "kx", ms=8, label="paper Fig. 2b")
    ax_b.set(xscale="log", xlabel="KL(p_tgt || p_inf)", ylabel="acceptance Z", title="(b) acceptance")
    span = [min(p["kl_before"] for ps in result["families"].values() for p in ps),
            max(p["kl_before"] for ps in result["families"].values() for p in ps)]
    ax_c.plot(span, span, "k--", lw=1, label="y = x (no correction)")
    ax_c.plot(span, [s / PAPER_REDUCTION for s in span], "k:", lw=1,
              label=f"y = x/{PAPER_REDUCTION:g} (paper)")
    ax_c.set(xscale="log", yscale="log", xlabel="KL(p_tgt || p_inf)", ylabel="KL(p_tgt || p'_inf)",
             title="(c) KL after OBRS")
    for ax in (ax_b, ax_c):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"OBRS, V={result['vocab']}, lambda={result['lambda']:g}, "
                 f"{result['protocol']['states']} states per point")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_sweep(sweep: dict, path: Path) -> None:
    """KL after vs acceptance, linear and log y, with no rejection, lam = 1 and classic RS marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    pts, nr, one, cl = sweep["points"], sweep["no_rejection"], sweep["lam_one"], sweep["classic"]
    for ax, yscale in zip(axes, ("linear", "log"), strict=True):
        # beyond classic rejection KL is 0; what the float32 closed form returns there is rounding
        shown = [p for p in pts if yscale == "linear" or p["kl_after"] > KL_NOISE_FLOOR]
        ax.plot([p["acceptance"] for p in shown], [p["kl_after"] for p in shown], "o-", ms=3,
                label="OBRS, lam = lambda_for_budget(budget)")
        ax.axhline(sweep["kl_before"], color="gray", ls="--", lw=1, label="no correction / uniform thinning")
        ax.plot(nr["acceptance"], nr["kl_after"], "s", ms=9, color="C3", label="no rejection (budget 1)")
        ax.plot(one["acceptance"], one["kl_after"], "D", ms=7, color="C1", label="lam = 1 (Fig. 2 setting)")
        if yscale == "linear":  # KL after classic rejection is 0: off a log axis
            ax.plot(cl["acceptance"], cl["kl_after"], "*", ms=13, color="C2",
                    label=f"classic rejection (lam = max r = {cl['lambda']:.3g})")
        else:
            ax.axvline(cl["acceptance"], color="C2", ls=":", label="classic rejection (KL 0)")
            ax.axhspan(KL_NOISE_FLOOR / 10, KL_NOISE_FLOOR, color="gray", alpha=0.15,
                       label="float32 rounding")
        ax.set(xlabel="acceptance (budget)", ylabel="KL(p_tgt || p'_inf)", yscale=yscale)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Budget sweep: one lognormal pair, V={sweep['vocab']}, KL before {sweep['kl_before']:.3f}")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output directory")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V")
    parser.add_argument("--lam", type=float, default=1.0, help="OBRS lambda for the grid and the toy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the (z, xi) draws")
    parser.add_argument("--n-sigma", type=int, default=20, help="geometric sigma grid size per family "
                        "(the two anchor points KL 0.001 and 0.009 are added)")
    parser.add_argument("--states", type=int, default=64,
                        help="independent (p_tgt, p_inf) pairs averaged per grid point (s alternates 2, 3)")
    parser.add_argument("--n-budgets", type=int, default=21,
                        help="budget-sweep points (two interleaved grids)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads while simulating "
                        "(the tensors are small, so 1 is fastest on a shared CPU); restored afterwards")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs")


def main(args: argparse.Namespace) -> int:
    if args.vocab < 4 or args.states < 1 or args.n_sigma < 2 or args.n_budgets < 2:
        raise SystemExit("need --vocab >= 4, --states >= 1, --n-sigma >= 2, --n-budgets >= 2")
    if not (math.isfinite(args.lam) and args.lam > 0):
        raise SystemExit(f"--lam must be a finite number > 0, got {args.lam}")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(args.threads, 1))
    try:
        result = simulate(args.vocab, args.states, args.n_sigma, args.lam, args.seed, args.n_budgets)
    finally:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, allow_nan=False)
    write_atomic(out / "simulation.json", lambda tmp: tmp.write_text(text))
    print_table(result)
    if not args.no_plot:
        plot_main(result, out / "simulation.png")
        plot_sweep(result["budget_sweep"], out / "budget_sweep.png")
    print(f"wrote {out / 'simulation.json'}" + ("" if args.no_plot else " and PNGs"))
    return 0
