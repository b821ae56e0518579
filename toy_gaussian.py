"""Forward vs. reverse KL on a toy problem: fit one Gaussian to a mixture.

This is the 1-D picture behind MiniLLM (Gu et al., "MiniLLM: Knowledge
Distillation of Large Language Models", ICLR 2024, Figure 2).  A *teacher*
distribution p is a mixture of Gaussians with several modes; the *student* q is
a single Gaussian N(mu, sigma^2), i.e. a model with too little capacity to
represent p exactly.  We fit the student twice, by gradient-based optimisation
(L-BFGS) in torch:

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

Reverse KL is not convex.  For well-separated modes it has one local optimum
per mode, and often a broad "compromise" one straddling the valley between
modes; a single gradient-based fit ends in whichever one its start leads to,
which need not be the best.  (An earlier version started from one fixed
point, mixture mean + 0.5 mixture std, and so fitted the mixture
0.65 N(-2.5, 0.6^2) + 0.35 N(2.5, 0.9^2) to its *lighter* mode, KL(q||p) = 1.05,
although sitting on the heavier one gives 0.43.)  So every fit here runs from
several starts (`start_points`):

* one per mixture component: mu at the component's mean, sigma at its std.
  A start sitting on a mode slides into that mode's local optimum, so every
  mode gets a chance, whichever side of the mixture it is on;
* the moment-matched start: mu, sigma = the mixture's mean and std.  Being
  broad, it often ends in the compromise optimum, if there is one;
* optionally one more, --init-mu / --init-sigma (see below).

The end points are merged when their mu and sigma agree to within 1e-3 mixture
stds (`distinct_optima`) and sorted by the minimised KL.  The best one is
reported as *the* fit; the others are listed in the table and the JSON and
drawn faintly in the figure.  This is the best of the optima these starts
reach, not a proof of global optimality, but there is a start on every mode
and a broad one (the tests compare with a brute-force grid search).  For the
default teacher 0.4 N(-3, 1) + 0.6 N(3, 1) the three starts reach three local
optima of reverse KL: the heavier right mode (KL(q||p) = 0.51, the best), the
compromise across both modes (0.85) and the lighter left mode (0.91).  The
forward fit runs from the same starts; forward KL has a single optimum, so
they all end at moment matching (the table says "all 3 starts").

--init-mu / --init-sigma *add* a start, named "init", to that set (a missing
half is taken from the moment-matched start).  The reported fit is still the
best over all starts; the table shows which optimum the extra start reached.

Both KLs are computed by numerical integration (trapezoid rule) on fine
uniform grids: forward KL on an x grid covering p, reverse KL on a grid that
follows q (x = mu + sigma z), with log p evaluated by logsumexp so that the
tails do not underflow to log 0 = -inf.

Command line (a few seconds on a laptop CPU, mostly importing torch):

    python toy_gaussian.py                      # table + toy_gaussian.png
    python toy_gaussian.py --json               # one JSON object on stdout, no figure
    python toy_gaussian.py --json --out f.png   # ... and the figure f.png
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
# Fitting: one start, then many starts
# ----------------------------------------------------------------------------

def start_points(means, stds, weights, init_mu=None, init_sigma=None):
    """The starts every fit runs from, as a list of (name, mu0, sigma0).

        "comp k"   mu0, sigma0 = mean and std of component k (k = 1..K)
        "moments"  mu0, sigma0 = mean and std of the whole mixture
        "init"     (init_mu, init_sigma), only if either is given; a missing
                   half is taken from the moment-matched start

    Why these: reverse KL has (at most) one local optimum per well-separated
    mode, and a start sitting on a mode, as narrow as it, slides into that
    mode's optimum.  So the per-component starts give every mode a chance,
    whichever side of the mixture it is on.  The broad moment-matched start
    covers the remaining kind of optimum, a wide compromise across several
    modes.  Forward KL has a single optimum and reaches it from any of these.
    """
    mean, std = mixture_moments(means, stds, weights)
    starts = [(f"comp {k + 1}", float(m), float(s))
              for k, (m, s) in enumerate(zip(means, stds))]
    starts.append(("moments", mean, std))
    if init_mu is not None or init_sigma is not None:
        starts.append(("init",
                       mean if init_mu is None else float(init_mu),
                       std if init_sigma is None else float(init_sigma)))
    return starts


def fit_once(means, stds, weights, direction, mu0, sigma0, steps=200,
             num_points=8001):
    """One L-BFGS fit of q = N(mu, sigma^2) from the start (mu0, sigma0).

    direction: "forward" minimises KL(p || q) (mass-covering; optimum is
               moment matching), "reverse" minimises KL(q || p) (mode-seeking).
    steps:     maximum L-BFGS iterations (it usually converges in far fewer).

    sigma is optimised as log sigma, so it stays positive without constraints.
    L-BFGS with a strong-Wolfe line search is deterministic and, on this
    smooth two-parameter problem, converges to ~1e-10 in a few dozen steps,
    to the local optimum that the start leads to (use `fit` for the best
    over several starts).

    Returns (mu, sigma, kl) as Python floats, kl being the minimised objective.
    """
    if direction not in KL_FUNCTIONS:
        raise ValueError(
            f"direction must be 'forward' or 'reverse', got {direction!r}")
    kl_fn = KL_FUNCTIONS[direction]
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


def distinct_optima(end_points, scale, tol=1e-3):
    """Merge fit end points that are the same optimum; best (lowest KL) first.

    end_points: list of (start_name, mu, sigma, kl), one per start.
    Two end points are the same optimum when both |d mu| and |d sigma| are
    at most tol * scale (scale: the mixture std, so the test does not depend
    on the units of x).  Different starts reach the same optimum only to
    within the optimiser's precision (~1e-6 here), hence a tolerance rather
    than equality; distinct optima are a sizeable fraction of a mode's width
    apart.  Both mu and sigma are compared: two optima can share mu (a
    narrow fit on a central mode and a broad one around it).

    Returns a list of dicts {"mu", "sigma", "kl", "starts"}, sorted by kl;
    "starts" names every start that ended there, in the order given.  Each
    optimum keeps the first end point that reached it.
    """
    optima = []
    for name, mu, sigma, kl in end_points:
        for opt in optima:
            if (abs(opt["mu"] - mu) <= tol * scale
                    and abs(opt["sigma"] - sigma) <= tol * scale):
                opt["starts"].append(name)
                break
        else:
            optima.append({"mu": mu, "sigma": sigma, "kl": kl, "starts": [name]})
    return sorted(optima, key=lambda opt: opt["kl"])


def local_optima(means, stds, weights, direction, starts, steps=200,
                 num_points=8001):
    """Fit from every (name, mu0, sigma0) in `starts`; the distinct optima, best first.

    An L-BFGS end point is strictly a stationary point; from these starts it
    is a local minimum in every case we tried (the tests check the Hessian),
    though a start exactly on a symmetry axis could in principle stop on a
    saddle.
    """
    end_points = [(name, *fit_once(means, stds, weights, direction, mu0, sigma0,
                                   steps=steps, num_points=num_points))
                  for name, mu0, sigma0 in starts]
    _, std = mixture_moments(means, stds, weights)
    return distinct_optima(end_points, scale=std)


def fit(means, stds, weights, direction, steps=200, init_mu=None,
        init_sigma=None, num_points=8001):
    """The best fit of q = N(mu, sigma^2) over all `start_points`.

    Runs `fit_once` from every start (init_mu / init_sigma, if given, add
    one start) and returns the (mu, sigma, kl) with the lowest minimised KL.
    For forward KL every start gives the same answer; for reverse KL this is
    what makes the fit land on the best mode rather than the nearest one.
    """
    starts = start_points(means, stds, weights, init_mu, init_sigma)
    best = local_optima(means, stds, weights, direction, starts, steps=steps,
                        num_points=num_points)[0]
    return best["mu"], best["sigma"], best["kl"]


# ----------------------------------------------------------------------------
# Output: table, JSON, figure
# ----------------------------------------------------------------------------

def run(means, stds, weights, steps=200, init_mu=None, init_sigma=None,
        num_points=8001):
    """Both multi-start fits plus cross-evaluated KLs, as a plain dict.

        "mixture":          closed-form mean and std of p
        "starts":           [{"name", "mu", "sigma"}], see `start_points`
        "forward_optima",   distinct optima of each direction, best first:
        "reverse_optima":   [{"mu", "sigma", "kl", "starts",
                              "kl_forward", "kl_reverse"}]
        "forward",          the best optimum of each direction (the first
        "reverse":          one in its list), i.e. the reported fit
    """
    mean, std = mixture_moments(means, stds, weights)
    starts = start_points(means, stds, weights, init_mu, init_sigma)
    x_grid = grid_for("forward", means, stds, weights, num_points)
    z_grid = grid_for("reverse", means, stds, weights, num_points)
    result = {"mixture": {"mean": mean, "std": std},
              "starts": [{"name": n, "mu": m, "sigma": s} for n, m, s in starts]}
    for direction in ("forward", "reverse"):
        optima = local_optima(means, stds, weights, direction, starts,
                              steps=steps, num_points=num_points)
        for opt in optima:
            # Both divergences of every optimum, for the table: the one
            # minimised, and the other one, to show what each fit gives up.
            mu, sigma = opt["mu"], opt["sigma"]
            opt["kl_forward"] = float(forward_kl(mu, sigma, means, stds, weights, x_grid))
            opt["kl_reverse"] = float(reverse_kl(mu, sigma, means, stds, weights, z_grid))
        result[f"{direction}_optima"] = optima
        result[direction] = optima[0]
    return result


def json_summary(result):
    """The --json object: the best fits and every distinct optimum.

    "forward" / "reverse" hold the best fit's mu, sigma and "kl", the
    objective that fit minimised.  "forward_optima" / "reverse_optima" list
    every distinct local optimum, best first, with both divergences
    ("kl_forward" = KL(p||q), "kl_reverse" = KL(q||p)) and the names of the
    starts that reached it.
    """
    summary = {"mixture": result["mixture"], "starts": result["starts"]}
    for direction in ("forward", "reverse"):
        best = result[direction]
        summary[direction] = {key: best[key] for key in ("mu", "sigma", "kl")}
        summary[f"{direction}_optima"] = [
            {key: opt[key] for key in ("mu", "sigma", "kl_forward", "kl_reverse", "starts")}
            for opt in result[f"{direction}_optima"]]
    return summary


def _reached_from(opt, num_starts):
    """Table cell naming the starts that ended at this optimum."""
    if len(opt["starts"]) == num_starts > 1:
        return f"all {num_starts} starts"
    return ", ".join(opt["starts"])


def format_table(result):
    """Fixed-width table: every distinct optimum of both fits, best one first.

    The first row of each direction is the reported fit; further rows are
    its other local optima (in practice only reverse KL has any).
    """
    m = result["mixture"]
    starts = result["starts"]
    start_list = ", ".join(f"{s['name']} ({s['mu']:.3g}, {s['sigma']:.3g})" for s in starts)
    lines = [
        f"teacher mixture: mean = {m['mean']:.4f}, std = {m['std']:.4f}",
        f"starts (mu, sigma): {start_list}",
        f"{'fit':<22}{'mu':>9}{'sigma':>9}{'KL(p||q)':>11}{'KL(q||p)':>11}   reached from",
    ]
    for direction, name in (("forward", "forward KL fit"), ("reverse", "reverse KL fit")):
        for i, opt in enumerate(result[f"{direction}_optima"]):
            label = name if i == 0 else "  other local optimum"
            lines.append(f"{label:<22}{opt['mu']:>9.4f}{opt['sigma']:>9.4f}"
                         f"{opt['kl_forward']:>11.4f}{opt['kl_reverse']:>11.4f}"
                         f"   {_reached_from(opt, len(starts))}")
    return "\n".join(lines)


def plot(result, means, stds, weights, out):
    """Figure 2-style plot: teacher density, the forward fit, the best reverse
    fit (bold) and the other local optima of reverse KL (faint)."""
    import matplotlib  # lazy: importing this module must not pull in matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means_t, stds_t = _t(means), _t(stds)
    lo = float(means_t.min() - 4 * stds_t.max())
    hi = float(means_t.max() + 4 * stds_t.max())
    x = torch.linspace(lo, hi, 1000, dtype=DTYPE)
    p = torch.exp(mixture_log_density(x, means, stds, weights))

    def density(opt):
        return torch.exp(gaussian_log_density(x, opt["mu"], opt["sigma"])).numpy()

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.fill_between(x.numpy(), p.numpy(), color="0.85")
    ax.plot(x.numpy(), p.numpy(), color="black", lw=2, label="teacher p (mixture)")
    fwd = result["forward"]
    ax.plot(x.numpy(), density(fwd), color="tab:blue", ls="--", lw=2,
            label=f"forward KL(p||q): mass-covering\n"
                  f"  mu={fwd['mu']:.2f}, sigma={fwd['sigma']:.2f}, KL(p||q)={fwd['kl_forward']:.3f}")
    rev = result["reverse"]
    # zorder keeps the reported (best) fit on top of the faint optima drawn
    # after it, while the legend still lists it right after the forward fit.
    ax.plot(x.numpy(), density(rev), color="tab:red", lw=2.5, zorder=3,
            label=f"reverse KL(q||p): mode-seeking, best of "
                  f"{len(result['starts'])} starts\n"
                  f"  mu={rev['mu']:.2f}, sigma={rev['sigma']:.2f}, KL(q||p)={rev['kl_reverse']:.3f}")
    # The other local optima, faint: what a single unlucky start would have
    # reported instead.
    for opt in result["reverse_optima"][1:]:
        ax.plot(x.numpy(), density(opt), color="tab:red", ls=":", lw=1.5, alpha=0.45,
                label=f"reverse KL, other local optimum (from {', '.join(opt['starts'])})\n"
                      f"  mu={opt['mu']:.2f}, sigma={opt['sigma']:.2f}, KL(q||p)={opt['kl_reverse']:.3f}")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=0)
    ax.set_title("Fitting one Gaussian q to a Gaussian mixture p\n"
                 "(cf. MiniLLM, Gu et al. ICLR 2024, Fig. 2)")
    # Legend beside the axes: inside, it would hide the curves of the
    # faint optima, which can sit anywhere.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


DEFAULT_OUT = "toy_gaussian.png"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fit a single Gaussian to a 1-D Gaussian mixture with forward "
                    "KL(p||q) (mass-covering, = moment matching) and reverse "
                    "KL(q||p) (mode-seeking, as in MiniLLM), and plot both fits. "
                    "Every fit runs from several starts (one per mixture "
                    "component, plus the mixture's mean and std); the best "
                    "optimum is reported, and the other local optima listed.")
    parser.add_argument("--means", type=float, nargs="+", default=list(DEFAULT_MEANS),
                        help="component means of the teacher mixture (default: -3 3)")
    parser.add_argument("--stds", type=float, nargs="+", default=list(DEFAULT_STDS),
                        help="component standard deviations, > 0 (default: 1 1)")
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                        help="component weights, > 0, normalised to sum to 1 "
                             "(default: 0.4 0.6, so the right mode is heavier)")
    parser.add_argument("--init-mu", type=float, default=None,
                        help="add one start, named 'init', at this mu to the "
                             "default starts (it does not replace them: the "
                             "reported fit is still the best over all starts, "
                             "and the table shows which optimum 'init' "
                             "reached); without --init-sigma its sigma is the "
                             "mixture std")
    parser.add_argument("--init-sigma", type=float, default=None,
                        help="sigma of the added 'init' start; without "
                             "--init-mu its mu is the mixture mean")
    parser.add_argument("--steps", type=int, default=200,
                        help="maximum L-BFGS iterations per fit (default: 200)")
    parser.add_argument("--num-points", type=int, default=8001,
                        help="grid points for each KL integral (default: 8001)")
    parser.add_argument("--out", default=None,
                        help=f"where to write the figure (default: {DEFAULT_OUT}, "
                             "but with --json only if --out is given)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write the figure, even if --out is given")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object (mixture mean/std, "
                             "the starts, the best fit of each direction and "
                             "every distinct local optimum) instead of the "
                             "table; writes no figure unless --out is given")
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


def figure_path(args):
    """Where to write the figure, or None for no figure.

    The table is for people, so it comes with the figure by default; --json
    is for scripts, which should not find a PNG dropped into their working
    directory unless they asked for one with --out.
    """
    if args.no_plot:
        return None
    if args.out is not None:
        return args.out
    return None if args.json else DEFAULT_OUT


def main(argv=None):
    args = parse_args(argv)
    result = run(args.means, args.stds, args.weights, steps=args.steps,
                 init_mu=args.init_mu, init_sigma=args.init_sigma,
                 num_points=args.num_points)
    out = figure_path(args)
    if out is not None:
        plot(result, args.means, args.stds, args.weights, out)
    if args.json:
        print(json.dumps(json_summary(result)))
    else:
        print(format_table(result))
        if out is not None:
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
