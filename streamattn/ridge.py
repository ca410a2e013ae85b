"""Large d: ridge universal sets against a Frequent Directions sketch, and a JL-sketched path.

Mathematics (DESIGN 2.1, 2.6). With G = KᵀK and λ > 0 the ridge leverage score is
τ^λ_j = k_jᵀ (G + λI)⁻¹ k_j. Cauchy–Schwarz in the G + λI metric gives, for every query q,

    A_qj = (q·k_j)² / ‖Kq‖² ≤ τ^λ_j · (1 + λ‖q‖²/‖Kq‖²),

so A_qj ≥ ε ⇒ τ^λ_j ≥ ε / (1 + λ‖q‖²/‖Kq‖²): a *ridge-type* statement, weaker than the
exact p = 2 one (τ^λ ≤ τ), and never called exact. No d × d factor is needed: with an
ℓ-row Frequent Directions sketch B (0 ⪯ G − BᵀB ⪯ Δ·I, :mod:`frequent_directions`) and
B = U S Vᵀ,

    τ̂_j = k_jᵀ (BᵀB + λI)⁻¹ k_j = (‖k_j‖² − Σ_i s_i²/(s_i² + λ)·(v_i·k_j)²) / λ ≥ τ^λ_j,

since BᵀB ⪯ G; the cost is O(ℓ·d) per row.

One pass (:class:`RidgeFD`). The state is an FD sketch of the rows so far plus the
candidate rows with τ̂ ≥ ε against the *current* sketch. A row dropped at time t had
τ̂_t < ε, hence τ^λ against the Gram of the rows seen by then is < ε, hence (rows only add
to G) its final τ^λ is < ε: the result is a superset of the exact ridge set
{j : τ^λ_j ≥ ε}, for any chunking and any merge tree (the set itself depends on them,
the superset property does not). Candidates number at most Σ_j τ̂_j / ε ≤ S/ε with
S = Σ_{i ≤ ℓ} (s_i² + Δ)/(s_i² + λ) + (d − ℓ)·Δ/λ (from G ⪯ BᵀB + ΔI), reported.
λ may be absolute (``lam``) or relative (``lam_rel`` × ‖K‖_F²/d of the rows seen so far);
both only grow, which only lowers scores, so pruning stays safe. Prefer ``lam_rel``: then
Δ/λ ≤ d/(ℓ·lam_rel) at every step (Δ ≤ ‖K‖_F²/ℓ), so S ≤ d·max(1, d/(ℓ·lam_rel)) and the
candidate memory is bounded independently of n; with an absolute λ, Δ/λ grows with n.

Sketched scores (:func:`ridge_universal_set` with ``sketch_eps``): a second pass scores
every row as τ̃_j = ‖k_jᵀ M^{−1/2} Π‖², M = BᵀB + λI, Π a d × m Gaussian N(0, 1/m) matrix
drawn from ``seed``. For each row, P(|τ̃_j − τ̂_j| > ε'·τ̂_j) ≤ 2·exp(−m(ε'²/2 − ε'³/3)/2)
(Dasgupta & Gupta 2003), so with m = ⌈4·ln(2n/δ)/(ε'²/2 − ε'³/3)⌉ every row is within
(1 ± ε') of τ̂ with probability ≥ 1 − δ. The pass keeps τ̃_j ≥ (1 − ε')·ε, so with that
probability no row with τ̂_j ≥ ε (in particular none of the exact ridge set) is missed.
The per-row cost is O(d·m) instead of O(d·ℓ): a gain only when m < ℓ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamattn.errors import ConfigError
from streamattn.operators.frequent_directions import FDSketch, FDSpec, FrequentDirections
from streamattn.operators.protocol import Operator, State
from streamattn.source import Block, KeySource, open_keys


@dataclass(frozen=True)
class RidgeMap:
    """τ̂(k) = kᵀ(BᵀB + λI)⁻¹k from the SVD of an FD sketch, in O(ℓ·d) per row."""

    v: np.ndarray  # d × r right singular vectors of B
    shrink: np.ndarray  # s_i² / (s_i² + λ)
    lam: float

    @classmethod
    def from_sketch(cls, b: np.ndarray, lam: float) -> RidgeMap:
        d = b.shape[1]
        if b.shape[0] == 0 or not np.any(b):
            return cls(np.zeros((d, 0)), np.zeros(0), lam)
        _, s, vt = np.linalg.svd(b, full_matrices=False)
        keep = s > 0
        s2 = s[keep] ** 2
        return cls(vt[keep].T, s2 / (s2 + lam), lam)

    def scores(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.v
        sq = np.einsum("ij,ij->i", x, x) - (y * y) @ self.shrink
        return np.maximum(sq, 0.0) / self.lam

    def inverse_sqrt_times(self, pi: np.ndarray) -> np.ndarray:
        """(BᵀB + λI)^{−1/2} Π, without a d × d matrix."""
        factor = 1.0 - np.sqrt(1.0 - self.shrink)  # 1 − √(λ/(s² + λ))
        return (pi - self.v @ (factor[:, None] * (self.v.T @ pi))) / math.sqrt(self.lam)


def effective_bound(sketch: FDSketch, lam: float, d: int) -> float:
    """S ≥ Σ_j τ̂_j: Σ_i (s_i² + Δ)/(s_i² + λ) + (d − rank B)·Δ/λ (G ⪯ BᵀB + ΔI)."""
    s2 = np.linalg.svd(sketch.sketch, compute_uv=False) ** 2
    s2 = s2[s2 > 0]
    return float(np.sum((s2 + sketch.delta) / (s2 + lam)) + (d - s2.size) * sketch.delta / lam)


@dataclass(frozen=True)
class RidgeFDSpec:
    """One-pass ridge set against an ℓ-row FD sketch: keep rows with τ̂ ≥ ``threshold``.

    λ = ``lam`` + ``lam_rel`` · ‖K‖_F² / d (‖K‖_F² of the rows folded so far); λ > 0.
    """

    ell: int
    threshold: float
    lam: float = 0.0
    lam_rel: float = 0.0


class RidgeFD(Operator):
    """Superset of the exact ridge set {j : τ^λ_j ≥ threshold} in one pass, no d × d matrix.

    Memory: O(ℓ·d + (S/threshold)·d) floats (S as in :func:`effective_bound`), any n.
    """

    family = "ridge-fd"
    Spec = RidgeFDSpec
    needs_values = True

    def __init__(self, spec: RidgeFDSpec) -> None:
        super().__init__(spec)
        if spec.lam < 0 or spec.lam_rel < 0 or spec.lam + spec.lam_rel <= 0:
            raise ConfigError(
                f"ridge lambda must be > 0: give lam > 0 or lam_rel > 0, got lam = {spec.lam}, "
                f"lam_rel = {spec.lam_rel}."
            )
        self.fd = FrequentDirections(FDSpec(spec.ell))
        self.idx = np.zeros(0, dtype=np.int64)
        self.rows = np.zeros((0, 0))
        self.values: np.ndarray | None = None

    def lam(self, fro2: float, d: int) -> float:
        return self.spec.lam + self.spec.lam_rel * fro2 / d

    def _ridge_map(self) -> RidgeMap:
        sk = self.fd.result()
        return RidgeMap.from_sketch(sk.sketch, self.lam(sk.fro2, sk.sketch.shape[1]))

    def _prune(self, idx: np.ndarray, rows: np.ndarray, values: np.ndarray | None) -> None:
        keep = self._ridge_map().scores(rows) >= self.spec.threshold
        order = np.argsort(idx[keep], kind="stable")
        self.idx, self.rows = idx[keep][order], rows[keep][order]
        self.values = None if values is None else values[keep][order]

    def _update(self, block: Block) -> None:
        x = np.asarray(block.rows, dtype=np.float64)
        if self.rows.size == 0 and self.idx.size == 0:
            self.rows = np.zeros((0, x.shape[1]))
            if block.values is not None:
                self.values = np.zeros((0, block.values.shape[1]))
        self.fd.update(block)
        values = None
        if self.values is not None and block.values is not None:
            values = np.vstack([self.values, np.asarray(block.values, np.float64)])
        idx = np.arange(block.start, block.stop, dtype=np.int64)
        self._prune(np.concatenate([self.idx, idx]), np.vstack([self.rows, x]), values)

    def _merge(self, other: RidgeFD) -> None:
        self.fd.merge(other.fd)
        values = None
        if self.values is not None and other.values is not None:
            values = np.vstack([self.values, other.values])
        self._prune(
            np.concatenate([self.idx, other.idx]), np.vstack([self.rows, other.rows]), values
        )

    def _state(self) -> State:
        out: State = {f"fd.{k}": v for k, v in self.fd.to_state().items()}
        out.update({"idx": self.idx, "rows": self.rows})
        if self.values is not None:
            out["values"] = self.values
        return out

    def _load(self, state: State) -> None:
        fd = Operator.from_state({k[3:]: v for k, v in state.items() if k.startswith("fd.")})
        assert isinstance(fd, FrequentDirections)
        self.fd = fd
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.rows = np.array(state["rows"], dtype=np.float64)
        self.values = np.array(state["values"], dtype=np.float64) if "values" in state else None

    def result(self) -> dict[str, Any]:
        """Candidates with their final τ̂ (≥ τ^λ), the sketch, λ and the size bound S/ε."""
        sk = self.fd.result()
        d = sk.sketch.shape[1]
        lam = self.lam(sk.fro2, d) if d else self.spec.lam
        rmap = RidgeMap.from_sketch(sk.sketch, lam) if d else None
        scores = rmap.scores(self.rows) if rmap is not None and self.idx.size else np.zeros(0)
        return {
            "indices": self.idx.copy(),
            "scores": scores,
            "rows": self.rows.copy(),
            "values": None if self.values is None else self.values.copy(),
            "sketch": sk,
            "lam": lam,
            "ridge_map": rmap,
            "sum_scores_bound": effective_bound(sk, lam, d) if d else 0.0,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int, d_values: int = 0) -> int:
        """Candidates ≤ S/threshold ≤ d·max(1, Δ/λ)/threshold, and Δ/λ ≤ d/(ℓ·lam_rel)
        (Δ ≤ ‖K‖_F²/ℓ): bounded in n when ``lam_rel`` > 0. With an absolute λ only, Δ/λ
        grows with the data; the bound below then assumes Δ ≤ λ·d/ℓ."""
        ratio = d / self.spec.ell / (self.spec.lam_rel if self.spec.lam_rel > 0 else 1.0)
        count = int(d * max(1.0, ratio) / self.spec.threshold) + 1
        return self.fd.nbytes_bound(d) + 8 * count * (d + d_values + 1)


@dataclass(frozen=True)
class SketchedScoresSpec:
    """Keep rows with ‖k·w‖² ≥ ``threshold`` for a fixed d × m map ``w``."""

    w: np.ndarray
    threshold: float


class SketchedScores(Operator):
    """Mergeable threshold collector for a fixed scoring map (the JL-sketched pass).

    Memory: O(|kept| · d + d·m); |kept| ≤ Σ_j ‖k_j w‖² / threshold.
    """

    family = "sketched-scores"
    Spec = SketchedScoresSpec
    needs_values = True

    def __init__(self, spec: SketchedScoresSpec) -> None:
        super().__init__(spec)
        self.idx = np.zeros(0, dtype=np.int64)
        self.scores = np.zeros(0)
        self.rows = np.zeros((0, spec.w.shape[0]))
        self.values: np.ndarray | None = None
        self.total = 0.0

    def _update(self, block: Block) -> None:
        x = np.asarray(block.rows, dtype=np.float64)
        y = x @ self.spec.w
        s = np.einsum("ij,ij->i", y, y)
        self.total += float(s.sum())
        sel = np.flatnonzero(s >= self.spec.threshold)
        vals = None if block.values is None else np.asarray(block.values[sel], np.float64)
        self._add(block.start + sel.astype(np.int64), s[sel], x[sel], vals)

    def _add(self, idx: np.ndarray, s: np.ndarray, rows: np.ndarray, vals: Any) -> None:
        if vals is not None and self.values is None and self.idx.size == 0:
            self.values = np.zeros((0, vals.shape[1]))
        idx = np.concatenate([self.idx, idx])
        order = np.argsort(idx, kind="stable")
        self.idx = idx[order]
        self.scores = np.concatenate([self.scores, s])[order]
        self.rows = np.vstack([self.rows, rows])[order]
        if self.values is not None and vals is not None:
            self.values = np.vstack([self.values, vals])[order]

    def _merge(self, other: SketchedScores) -> None:
        self.total += other.total
        self._add(other.idx, other.scores, other.rows, other.values)

    def _state(self) -> State:
        out: State = {
            "idx": self.idx,
            "scores": self.scores,
            "rows": self.rows,
            "total": np.array(self.total),
        }
        if self.values is not None:
            out["values"] = self.values
        return out

    def _load(self, state: State) -> None:
        self.idx = np.array(state["idx"], dtype=np.int64)
        self.scores = np.array(state["scores"], dtype=np.float64)
        self.rows = np.array(state["rows"], dtype=np.float64)
        self.total = float(state["total"])
        self.values = np.array(state["values"], dtype=np.float64) if "values" in state else None

    def result(self) -> dict[str, Any]:
        return {
            "indices": self.idx.copy(),
            "scores": self.scores.copy(),
            "rows": self.rows.copy(),
            "values": None if self.values is None else self.values.copy(),
            "sum_scores": self.total,
            "n": self.n_rows,
        }

    def nbytes_bound(self, d: int) -> int:
        return self.spec.w.nbytes  # plus the kept rows, bounded by Σ scores / threshold


def jl_dimension(n: int, eps: float, delta: float) -> int:
    """m with P(some of n rows' squared norms leaves (1 ± eps)) ≤ delta (Dasgupta–Gupta)."""
    return math.ceil(4.0 * math.log(2.0 * n / delta) / (eps**2 / 2.0 - eps**3 / 3.0))


RIDGE_GUARANTEE = (
    "Ridge-type (weaker than exact): for f(x) = x^2 attention and every query q, "
    "A_qj >= eps * (1 + lam*||q||^2/||Kq||^2) implies j in U, because A_qj <= "
    "tau^lam_j * (1 + lam*||q||^2/||Kq||^2) and the scores used are upper bounds "
    "k_j^T (B^T B + lam I)^-1 k_j >= tau^lam_j (B the FD sketch, B^T B <= K^T K)."
)


def _check(eps: float, ell: int, sketch_eps: float | None, delta: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise ConfigError(f"eps must be in (0, 1], got {eps!r}.")
    FDSpec(ell)
    if sketch_eps is not None and not 0 < sketch_eps < 1:
        raise ConfigError(f"sketch_eps must be in (0, 1), got {sketch_eps!r}.")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}.")


def ridge_universal_set(
    source: Any,
    eps: float,
    *,
    ell: int,
    lam: float = 0.0,
    lam_rel: float = 0.1,
    sketch_eps: float | None = None,
    delta: float = 1e-3,
    seed: int = 0,
    chunk_rows: int | None = None,
    engine: str = "local",
    progress: bool = False,
    array: str | None = None,
    **engine_options: Any,
) -> Any:
    """Ridge universal set for large d, in bounded memory with no d × d matrix.

    Without ``sketch_eps``: one pass of :class:`RidgeFD`; U ⊇ {j : τ^λ_j ≥ eps} surely.
    With ``sketch_eps`` = ε': an FD pass, then a pass keeping rows whose JL-sketched score
    is ≥ (1 − ε')·eps; U ⊇ {j : τ̂_j ≥ eps} ⊇ {j : τ^λ_j ≥ eps} with probability ≥ 1 − δ.
    λ = ``lam`` + ``lam_rel``·‖K‖_F²/d. The certificate carries λ, the FD error Δ, ℓ, the
    size bound and (sketched path) m, ε', δ and the seed.

    Examples
    --------
    >>> k = np.random.default_rng(0).standard_normal((2000, 32))
    >>> k[11] *= 30.0
    >>> u = ridge_universal_set(k, 0.2, ell=8, lam_rel=0.01)
    >>> 11 in u
    True
    """
    from streamattn.engines import engine_session, run_operators
    from streamattn.universal import SOFTMAX_NOTE, UniversalSet, versions

    _check(eps, ell, sketch_eps, delta)
    src: KeySource = open_keys(source, array=array)
    rows = int(chunk_rows) if chunk_rows is not None else src.default_chunk_rows()
    spec = RidgeFDSpec(ell, float(eps), float(lam), float(lam_rel))
    op = RidgeFD(spec)  # validates λ before any read
    with engine_session(engine, progress=progress, **engine_options) as opts:
        run = dict(engine=engine, chunk_rows=rows, progress=progress, **opts)
        cert: dict[str, Any] = {}
        if sketch_eps is None:
            (op,) = run_operators(src, [op], description="ridge-fd", **run)
            res = op.result()
            sk, lam_final = res["sketch"], res["lam"]
            keep = np.flatnonzero(res["scores"] >= eps)
            passes = 1
        else:
            (fd,) = run_operators(src, [FrequentDirections(FDSpec(ell))],
                                  description="frequent directions", **run)
            sk = fd.result()
            lam_final = op.lam(sk.fro2, src.d)
            m = jl_dimension(src.n, sketch_eps, delta)
            pi = np.random.default_rng(seed).standard_normal((src.d, m)) / math.sqrt(m)
            w = RidgeMap.from_sketch(sk.sketch, lam_final).inverse_sqrt_times(pi)
            threshold = (1.0 - sketch_eps) * eps
            (sc,) = run_operators(src, [SketchedScores(SketchedScoresSpec(w, threshold))],
                                  description="sketched scores", **run)
            res = sc.result()
            keep = np.arange(res["indices"].size)
            passes = 2
            cert.update(
                {
                    "sketch": "Gaussian JL, entries N(0, 1/m), seeded",
                    "sketch_m": m,
                    "sketch_eps": sketch_eps,
                    "sketch_delta": delta,
                    "seed": seed,
                    "sketch_threshold": threshold,
                    "sketch_statement": (
                        "with probability >= 1 - delta every row's sketched score is within "
                        "(1 +- sketch_eps) of k^T (B^T B + lam I)^-1 k (Dasgupta-Gupta, union "
                        "bound over n rows), so keeping sketched >= (1 - sketch_eps)*eps "
                        "misses no row with that score >= eps"
                    ),
                }
            )
    size_bound = effective_bound(sk, lam_final, src.d) / (eps * (1 - (sketch_eps or 0.0)))
    scores = res["scores"][keep]
    cert.update(
        {
            "mode": "threshold",
            "eps": eps,
            "budget": None,
            "variant": "ridge-fd" if sketch_eps is None else "ridge-fd-sketched",
            "n": src.n,
            "d": src.d,
            "dtype": str(src.dtype),
            "selected": int(keep.size),
            "ell": ell,
            "lam": lam_final,
            "lam_abs": lam,
            "lam_rel": lam_rel,
            "fd_delta": sk.delta,
            "fd_delta_bound": sk.delta_bound,
            "fd_statement": "0 <= K^T K - B^T B <= fd_delta * I",
            "fro2": sk.fro2,
            "scores": "k_j^T (B^T B + lam I)^-1 k_j >= ridge leverage tau^lam_j"
            + ("" if sketch_eps is None else " (JL-sketched, within 1 +- sketch_eps w.h.p.)"),
            "sum_scores_selected": float(scores.sum()),
            "size_bound": size_bound,
            "size_bound_holds": bool(keep.size <= size_bound + 1e-9),
            "numerical_rank": None,
            "rank_rtol": None,
            "passes": passes,
            "chunk_rows": rows,
            "guarantee": RIDGE_GUARANTEE,
            "exact": False,
            "softmax": SOFTMAX_NOTE,
            "source": src.describe(),
            "versions": versions(),
            "engine": engine,
        }
    )
    return UniversalSet.from_candidates(res, keep, scores, src.dtype, cert)
