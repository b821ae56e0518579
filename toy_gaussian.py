"""Forward vs. reverse KL on a toy problem: fit one Gaussian to a mixture.

This is the 1-D picture behind MiniLLM (Gu et al., "MiniLLM: Knowledge
Distillation of Large Language Models", ICLR 2024, Figure 2).  A *teacher*
distribution p is a mixture of Gaussians with several modes; the *student* q is
a single Gaussian N(mu, sigma^2), i.e. a model with too little capacity to
represent p exactly.  We fit the student twice, by gradient-based optimisation (L-BFGS) in
torch:

* Forward KL,  KL(p || q) = E_p[log p - log q]   (what standard KD minimises).
  Wherever p has mass, q must have mass too, otherwise log q -> -inf is paid
  for.  So the fit is *mass-covering*: it stretches over all modes and puts
  mass in the valleys between them, where p has almost none.  For the Gaussian
  family the optimum is known in closed form: exact moment matching,
  mu = E_p[x] and sigma^2 = Var_p[x]  (see `mixture_moments`).

* Reverse KL,  KL(q || p) = E_q[log q - log p]   (what MiniLLM minimises).
  Now q is punished for putting mass where p is small, and pays nothing for
  ignoring parts of p.  So the fit is *mode-seeking*: it sits on one mode and
  is about as narrow as that mode.  For a language model this means the student
  does not assign probability to text the teacher finds unlikely.

Reverse KL has (for well-separated modes) one local optimum per mode, so which
mode it finds depends on where it starts.  To make this deterministic, both
fits start from the same fixed point: mu = mixture mean + 0.5 mixture std,
sigma = smallest component std (see `default_init`).  From there the reverse
fit slides into the mode it starts next to; starting at the mixture mean
itself it would get stuck on a broad compromise between the modes, a third
local optimum.  With the default teacher (weights 0.4 / 0.6) the start is
mu = 2.15, so the reverse fit finds the heavier right-hand mode at +3.  Use
--init-mu / --init-sigma to start elsewhere (e.g. --init-mu -3 finds the left
mode).  The forward fit has a single optimum and
reaches moment matching from any start.

Both KLs are computed by numerical integration (trapezoid rule) on fine
uniform grids: forward KL on an x grid covering p, reverse KL on a grid that
follows q (x = mu + sigma z), with log p evaluated by logsumexp so that the
tails do not underflow to log 0 = -inf.

Command line (a few seconds on a laptop CPU, mostly importing torch):

    python toy_gaussian.py                      # table + toy_gaussian.png
    python toy_gaussian.py --json --no-plot     # one JSON object on stdout
    python toy_gaussian.py --means -4 0 4 --stds 1 1 1 --weights 0.3 0.3 0.4

Only torch is needed for the fits; matplotlib is imported (with the Agg
backend) only when a figure is written.
"""

import argparse
import json
import math

import torch

DTYPE = torch.float64  # float64: KL differences we report are small; avoid fp32 noise

# Default teacher: clearly bimodal, slightly unequal weights so the reverse fit
# has one best mode (the heavier one on the right).
DEFAULT_MEANS = (-3.0, 3.0)
DEFAULT_STDS = (1.0, 1.0)
DEFAULT_WEIGHTS = (0.4, 0.6)


# ----------------------------------------------------------------------------
# Densities
# ----------------------------------------------------------------------------

def _t(values):
    """A float64 tensor from a number / list / tensor (no copy if already one)."""
    return torch.as_tensor(values, dtype=DTYPE)


def gaussian_log_density(x, mu, sigma):
    """log N(x; mu, sigma^2) = -0.5 ((x - mu) / sigma)^2 - log sigma - 0.5 log(2 pi).

    Works elementwise and broadcasts; differentiable in mu and sigma.
    """
    x, mu, sigma = _t(x), _t(mu), _t(sigma)
    z = (x - mu) / sigma
    return -0.5 * z * z - torch.log(sigma) - 0.5 * math.log(2 * math.pi)


def mixture_log_density(x, means, stds, weights):
    """log p(x) for p(x) = sum_k w_k N(x; m_k, s_k^2).

    Computed as logsumexp_k [log w_k + log N(x; m_k, s_k^2)] so that far in the
    tails, where every component density underflows to 0 in floating point,
    log p is still a finite (very negative) number instead of -inf.  Weights
    are normalised to sum to 1.
    """
    x = _t(x)
    means, stds, weights = _t(means), _t(stds), _t(weights)
    log_w = torch.log(weights / weights.sum())
    # Shape (..., K): one column per component, then reduce over components.
    comp = gaussian_log_density(x.unsqueeze(-1), means, stds)
    return torch.logsumexp(log_w + comp, dim=-1)


def mixture_moments(means, stds, weights):
    """Closed-form mean and std of the mixture p = sum_k w_k N(m_k, s_k^2).

        mean = sum_k w_k m_k
        var  = sum_k w_k (s_k^2 + m_k^2) - mean^2     (E[x^2] - E[x]^2)

    Returns (mean, std) as Python floats.  These are exactly the parameters of
    the forward-KL-optimal Gaussian.
    """
    means, stds, weights = _t(means), _t(stds), _t(weights)
    w = weights / weights.sum()
    mean = (w * means).sum()
    var = (w * (stds ** 2 + means ** 2)).sum() - mean ** 2
    return float(mean), float(torch.sqrt(var))


# ----------------------------------------------------------------------------
# KL divergences by numerical integration
# ----------------------------------------------------------------------------

def integration_grid(means, stds, weights, num_points=8001):
    """Uniform x grid covering essentially all the mass of the teacher p.

    Range: [min_k m_k - 10 max_k s_k, max_k m_k + 10 max_k s_k].  Beyond 10
    std a Gaussian's mass is ~1e-23, far below anything we report.  This is the
    grid for expectations under p (forward KL); q need not be resolved on it,
    since log q is just a quadratic in x.  (`weights` is unused but kept so
    all grid/KL helpers take the same mixture arguments.)
    """
    means_t, stds_t = _t(means), _t(stds)
    lo = float(means_t.min() - 10 * stds_t.max())
    hi = float(means_t.max() + 10 * stds_t.max())
    return torch.linspace(lo, hi, num_points, dtype=DTYPE)


def forward_kl(mu, sigma, means, stds, weights, grid=None):
    """KL(p || q) = integral p(x) [log p(x) - log q(x)] dx,  q = N(mu, sigma^2).

    Trapezoid rule on `grid` (default: `integration_grid`).  Where p underflows
    to 0 the integrand is 0 * (finite) = 0, never NaN, because both logs are
    computed directly rather than as log(exp(...)).
    """
    if grid is None:
        grid = integration_grid(means, stds, weights)
    log_p = mixture_log_density(grid, means, stds, weights)
    log_q = gaussian_log_density(grid, mu, sigma)
    return torch.trapezoid(torch.exp(log_p) * (log_p - log_q), grid)


def standard_grid(num_points=8001, width=10.0):
    """Uniform grid of z in [-width, width] for integrals under a standard normal."""
    return torch.linspace(-width, width, num_points, dtype=DTYPE)


def reverse_kl(mu, sigma, means, stds, weights, grid=None):
    """KL(q || p) = integral q(x) [log q(x) - log p(x)] dx,  q = N(mu, sigma^2).

    The expectation is now under the student q, so the grid has to follow q:
    a fixed grid would stop resolving q once it gets narrow or wanders off the
    grid, and then the "integral" could be driven to 0 by the optimiser.  So
    we substitute x = mu + sigma z and integrate over z on `grid` (default
    `standard_grid`, z in [-10, 10]):

        KL(q || p) = integral N(z; 0, 1) [log q(mu + sigma z) - log p(mu + sigma z)] dz

    with the trapezoid rule.  This is the same integral, just on a grid that
    moves and stretches with q (and gradients flow through x to mu, sigma).
    """
    if grid is None:
        grid = standard_grid()
    mu, sigma = _t(mu), _t(sigma)
    x = mu + sigma * grid
    log_p = mixture_log_density(x, means, stds, weights)
    log_q = gaussian_log_density(x, mu, sigma)
    # dx = sigma dz and q(x) sigma = N(z; 0, 1): integrate N(z) (...) dz.
    return torch.trapezoid(torch.exp(log_q) * (log_q - log_p), x)


KL_FUNCTIONS = {"forward": forward_kl, "reverse": reverse_kl}


def grid_for(direction, means, stds, weights, num_points=8001):
    """The grid each KL integrates over: x under p (forward), z under q (reverse)."""
    if direction == "forward":
        return integration_grid(means, stds, weights, num_points)
    return standard_grid(num_points)


# ----------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------

def default_init(means, stds, weights):
    """Starting (mu, sigma) for `fit`, the same for both directions.

        mu0    = mixture mean + 0.5 * mixture std
        sigma0 = smallest component std

    Forward KL has a single optimum in (mu, log sigma), so its start does not
    matter.  Reverse KL has one local optimum per (well-separated) mode, plus
    a broad "compromise" one straddling the valley between two modes (for the
    default teacher: mu ~ 0.47, sigma ~ 2.70, try --init-mu 0 --init-sigma 1).
    Starting at the mixture mean, the fit falls into that compromise, so we
    start narrow and half a mixture std to the right: the fit then usually
    slides into the mode it starts next to (for other teachers it can still
    settle on a compromise; pass --init-mu at a mode to pick that mode).  The mixture mean already lies towards
    the heavier components and the offset breaks the tie for symmetric
    mixtures (to the right), so for the default teacher, and for symmetric
    two-mode teachers, the reverse fit finds the right-hand mode.
    """
    mean, std = mixture_moments(means, stds, weights)
    return mean + 0.5 * std, float(_t(stds).min())


def fit(means, stds, weights, direction, steps=200, init_mu=None,
        init_sigma=None, num_points=8001):
    """Fit q = N(mu, sigma^2) to the mixture by minimising KL in `direction`.

    direction: "forward" minimises KL(p || q) (mass-covering; optimum is
               moment matching), "reverse" minimises KL(q || p) (mode-seeking).
    steps:     maximum L-BFGS iterations (it usually converges in far fewer).
    init_mu, init_sigma: starting point; None uses `default_init`.

    sigma is optimised as log sigma, so it stays positive without constraints.
    L-BFGS with a strong-Wolfe line search is deterministic and, on this
    smooth two-parameter problem, converges to ~1e-10 in a few dozen steps.

    Returns (mu, sigma, kl) as Python floats, kl being the minimised objective.
    """
    if direction not in KL_FUNCTIONS:
        raise ValueError(
            f"direction must be 'forward' or 'reverse', got {direction!r}")
    kl_fn = KL_FUNCTIONS[direction]
    mu0, sigma0 = default_init(means, stds, weights)
    if init_mu is not None:
        mu0 = init_mu
    if init_sigma is not None:
        sigma0 = init_sigma

    grid = grid_for(direction, means, stds, weights, num_points)
    mu = torch.tensor(float(mu0), dtype=DTYPE, requires_grad=True)
    log_sigma = torch.tensor(math.log(sigma0), dtype=DTYPE, requires_grad=True)
    opt = torch.optim.LBFGS([mu, log_sigma], lr=1.0, max_iter=steps,
                            history_size=20, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kl_fn(mu, torch.exp(log_sigma), means, stds, weights, grid)
        loss.backward()
        return loss

    opt.step(closure)  # one call runs up to `steps` L-BFGS iterations

    with torch.no_grad():
        sigma = torch.exp(log_sigma)
        kl = kl_fn(mu, sigma, means, stds, weights, grid)
    return mu.item(), sigma.item(), kl.item()


# ----------------------------------------------------------------------------
# Output: table, JSON, figure
# ----------------------------------------------------------------------------

def run(means, stds, weights, steps=200, init_mu=None, init_sigma=None,
        num_points=8001):
    """Both fits plus the cross-evaluated KLs, as a plain dict."""
    mean, std = mixture_moments(means, stds, weights)
    x_grid = grid_for("forward", means, stds, weights, num_points)
    z_grid = grid_for("reverse", means, stds, weights, num_points)
    result = {"mixture": {"mean": mean, "std": std}}
    for direction in ("forward", "reverse"):
        mu, sigma, kl = fit(means, stds, weights, direction, steps=steps,
                            init_mu=init_mu, init_sigma=init_sigma,
                            num_points=num_points)
        result[direction] = {
            "mu": mu, "sigma": sigma, "kl": kl,
            # Both divergences of this fit, for the table.
            "forward_kl": float(forward_kl(mu, sigma, means, stds, weights, x_grid)),
            "reverse_kl": float(reverse_kl(mu, sigma, means, stds, weights, z_grid)),
        }
    return result


def format_table(result):
    """Small fixed-width table of the two fits (and the moment-matching target)."""
    m = result["mixture"]
    lines = [
        f"teacher mixture: mean = {m['mean']:.4f}, std = {m['std']:.4f}",
        f"{'fit':<16}{'mu':>9}{'sigma':>9}{'KL(p||q)':>11}{'KL(q||p)':>11}",
    ]
    for direction, name in (("forward", "forward KL fit"), ("reverse", "reverse KL fit")):
        r = result[direction]
        lines.append(f"{name:<16}{r['mu']:>9.4f}{r['sigma']:>9.4f}"
                     f"{r['forward_kl']:>11.4f}{r['reverse_kl']:>11.4f}")
    return "\n".join(lines)


def plot(result, means, stds, weights, out):
    """Figure 2-style plot: teacher density and the two single-Gaussian fits."""
    import matplotlib  # lazy: importing this module must not pull in matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means_t, stds_t = _t(means), _t(stds)
    lo = float(means_t.min() - 4 * stds_t.max())
    hi = float(means_t.max() + 4 * stds_t.max())
    x = torch.linspace(lo, hi, 1000, dtype=DTYPE)
    p = torch.exp(mixture_log_density(x, means, stds, weights))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x.numpy(), p.numpy(), color="0.85")
    ax.plot(x.numpy(), p.numpy(), color="black", lw=2, label="teacher p (mixture)")
    styles = {"forward": ("tab:blue", "--", "forward KL(p||q): mass-covering"),
              "reverse": ("tab:red", "-", "reverse KL(q||p): mode-seeking")}
    for direction, (color, ls, label) in styles.items():
        r = result[direction]
        q = torch.exp(gaussian_log_density(x, r["mu"], r["sigma"]))
        ax.plot(x.numpy(), q.numpy(), color=color, ls=ls, lw=2,
                label=f"{label}\n  mu={r['mu']:.2f}, sigma={r['sigma']:.2f}")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=0)
    ax.set_title("Fitting one Gaussian q to a Gaussian mixture p\n"
                 "(cf. MiniLLM, Gu et al. ICLR 2024, Fig. 2)")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fit a single Gaussian to a 1-D Gaussian mixture with forward "
                    "KL(p||q) (mass-covering, = moment matching) and reverse "
                    "KL(q||p) (mode-seeking, as in MiniLLM), and plot both fits.")
    parser.add_argument("--means", type=float, nargs="+", default=list(DEFAULT_MEANS),
                        help="component means of the teacher mixture (default: -3 3)")
    parser.add_argument("--stds", type=float, nargs="+", default=list(DEFAULT_STDS),
                        help="component standard deviations, > 0 (default: 1 1)")
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                        help="component weights, > 0, normalised to sum to 1 "
                             "(default: 0.4 0.6, so the right mode is heavier)")
    parser.add_argument("--init-mu", type=float, default=None,
                        help="starting mu for both fits (default: mixture mean "
                             "+ 0.5 mixture std; the reverse fit then "
                             "deterministically slides into the mode it starts "
                             "next to: the heavier right mode for the default "
                             "teacher; try -3 for the left one)")
    parser.add_argument("--init-sigma", type=float, default=None,
                        help="starting sigma for both fits (default: smallest "
                             "component std; a wide start, or one in the valley "
                             "between modes, can leave the reverse fit stuck on a "
                             "broad compromise covering both)")
    parser.add_argument("--steps", type=int, default=200,
                        help="maximum L-BFGS iterations per fit (default: 200)")
    parser.add_argument("--num-points", type=int, default=8001,
                        help="grid points for each KL integral (default: 8001)")
    parser.add_argument("--out", default="toy_gaussian.png",
                        help="where to write the figure (default: toy_gaussian.png)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write the figure")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object (mixture mean/std and "
                             "mu, sigma, minimised KL of each fit) instead of the table")
    args = parser.parse_args(argv)

    k = len(args.means)
    if len(args.stds) != k or len(args.weights) != k:
        parser.error("--means, --stds and --weights need the same number of values")
    if any(s <= 0 for s in args.stds):
        parser.error("--stds must all be > 0")
    if any(w <= 0 for w in args.weights):
        parser.error("--weights must all be > 0")
    if args.init_sigma is not None and args.init_sigma <= 0:
        parser.error("--init-sigma must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    result = run(args.means, args.stds, args.weights, steps=args.steps,
                 init_mu=args.init_mu, init_sigma=args.init_sigma,
                 num_points=args.num_points)
    if not args.no_plot:
        plot(result, args.means, args.stds, args.weights, args.out)
    if args.json:
        # Each "kl" is the objective that fit minimised.
        print(json.dumps({
            "mixture": result["mixture"],
            **{d: {key: result[d][key] for key in ("mu", "sigma", "kl")}
               for d in ("forward", "reverse")},
        }))
    else:
        print(format_table(result))
        if not args.no_plot:
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
