"""Activation statistics gathered per input channel while calibration windows pass a layer.

Everything here streams: memory is fixed by the number of channels (and bins or classes),
never by the number of calibration tokens, except the opt-in exact selectivity mode.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch

from secateurs.errors import SecateursError


@dataclass(frozen=True)
class SelectivityThresholds:
    """Thresholds of the selectivity statistics (as the seed): the activity percentile ``tau``,
    the spikiness quantile and clip; ``exact`` keeps every activation instead of a histogram.

    The IDF forms built on these rates are the selectivity methods' own
    (:mod:`secateurs.methods.selectivity`).
    """

    tau_percentile: float = 0.6
    top_quantile: float = 0.9
    spiky_clip: float = 10.0
    eps: float = 1e-10
    exact: bool = False

    def __post_init__(self) -> None:
        for name in ("tau_percentile", "top_quantile"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise SecateursError(f"{name} must be in (0, 1), got {value}")
        if not self.spiky_clip >= 1:
            raise SecateursError(f"spiky_clip must be >= 1, got {self.spiky_clip}")
        if self.eps <= 0:
            raise SecateursError(f"eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class StatsRequest:
    """Which statistics to gather beyond Wanda's norms, merged from method and recovery."""

    mean: bool = False
    gram: bool = False
    gram_fraction: float = 1.0
    selectivity: SelectivityThresholds | None = None
    classes: int = 0

    def merge(self, other: StatsRequest) -> StatsRequest:
        """Everything either request asks for; an exact Gram wins over a sampled one."""
        gram_fraction = max(
            self.gram_fraction if self.gram else 0.0, other.gram_fraction if other.gram else 0.0
        )
        return replace(
            self,
            mean=self.mean or other.mean,
            gram=self.gram or other.gram,
            gram_fraction=gram_fraction or 1.0,
            selectivity=self.selectivity or other.selectivity,
            classes=max(self.classes, other.classes),
        )


class MagnitudeHistogram:
    """Per-channel counts of ``|x|`` in bins of 1/32 octave from 2^-16 to 2^16.

    The bin of a value is read from its float32 bits (exponent and top 5 mantissa bits), so
    binning costs no logarithm. Within an octave the bins are equally wide, so a bin's width
    is at most 1/32 = 3.1% of its values. Bin 0 holds everything below 2^-16 (read as zero
    when it holds the threshold), the last bin everything from 2^16 up (counted as 2^16).
    """

    SUB_BITS = 5
    LOW_EXP, HIGH_EXP = -16, 16

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.channels = channels
        self.bins = (self.HIGH_EXP - self.LOW_EXP << self.SUB_BITS) + 2
        # int32 holds 2^31 values per bin and channel, far beyond any calibration set
        self.counts = torch.zeros(channels, self.bins, dtype=torch.int32, device=device)
        self._one = torch.ones((), dtype=torch.int32, device=device)
        self._first_code = (127 + self.LOW_EXP) << self.SUB_BITS
        self._offsets = torch.arange(channels, device=device, dtype=torch.int32) * self.bins

    def add(self, magnitudes: torch.Tensor) -> None:
        """Count a (tokens, channels) float32 tensor of non-negative values."""
        codes = magnitudes.contiguous().view(torch.int32) >> (23 - self.SUB_BITS)
        index = (codes - (self._first_code - 1)).clamp_(0, self.bins - 1) + self._offsets
        # adding into the table in place costs nothing per bin, only per value
        ones = self._one.expand(index.numel())
        self.counts.view(-1).index_add_(0, index.view(-1), ones)

    def edges(self) -> torch.Tensor:
        """Lower and upper bound of every bin, (bins, 2); the overflow bin is [2^16, 2^16]."""
        codes = torch.arange(self.bins - 1, dtype=torch.int32) + self._first_code
        bounds = (codes << (23 - self.SUB_BITS)).view(torch.float32)
        lower = torch.cat([torch.zeros(1), bounds])
        upper = torch.cat([bounds, bounds[-1:]])
        return torch.stack([lower, upper], dim=1).to(self.counts.device, torch.float64)


def _quantile(values: torch.Tensor, q: float) -> float:
    """The ``ceil(q * n)``-th smallest of all values."""
    flat = values.reshape(-1)
    return float(flat.kthvalue(max(1, math.ceil(q * flat.numel()))).values)


def _bin_bounds(edges: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bound and width of the bins ``index``."""
    return edges[index, 0], edges[index, 1] - edges[index, 0]


def _cdf(counts: torch.Tensor, edges: torch.Tensor, values: float | torch.Tensor) -> torch.Tensor:
    """Per-row count of values at most ``values`` (one or one per row), even inside a bin."""
    values = torch.as_tensor(values, dtype=torch.float64, device=counts.device)
    values = values.expand(counts.shape[0]).contiguous()
    index = torch.searchsorted(edges[:, 1].contiguous(), values, right=True)
    index = index.clamp_max(counts.shape[1] - 1)
    lower, width = _bin_bounds(edges, index)
    inside = torch.where(width > 0, (values - lower) / width.clamp_min(1e-300), 1.0)
    in_bin = counts.gather(1, index[:, None]).squeeze(1)
    before = (counts.cumsum(dim=1) - counts).gather(1, index[:, None]).squeeze(1)
    return before + in_bin * inside.clamp(0.0, 1.0)


def _quantiles(counts: torch.Tensor, edges: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """Each row's ``q`` quantile (one or one per row), values even inside a bin; bin 0 is 0."""
    cum = counts.cumsum(dim=1)
    target = torch.as_tensor(q, dtype=cum.dtype, device=cum.device).clamp(0.0, 1.0) * cum[:, -1]
    index = (cum < target[:, None]).sum(dim=1).clamp_max(counts.shape[1] - 1)
    in_bin = counts.gather(1, index[:, None]).squeeze(1)
    before = cum.gather(1, index[:, None]).squeeze(1) - in_bin
    share = torch.where(in_bin > 0, (target - before) / in_bin.clamp_min(1e-300), 0.0)
    lower, width = _bin_bounds(edges, index)
    return torch.where(index == 0, 0.0, lower + share.clamp(0.0, 1.0) * width)


class SelectivityStats:
    """Per-channel active rates and spikiness of a layer's input, streamed or, if exact, from all
    values.

    ``tau`` is the ``tau_percentile`` quantile of ``|x|`` over all tokens and channels,
    ``p_j`` the share of tokens with ``|x_j| > tau`` (the IDF forms of
    :mod:`secateurs.methods.selectivity` read it), ``r_j`` the share of tokens with ``|x_j|``
    above the channel's own mean ``|x_j|``; ``R_j`` is the mean of the top ``1 - top_quantile``
    of ``|x_j|`` over tokens divided by the mean of ``|x_j|``, clipped to ``[1, spiky_clip]``.

    Streamed, the first batch fixes provisional thresholds (the global ``tau`` and each
    channel's top quantile) and every batch adds exact per-channel sums against them: the
    count above ``tau`` and the excess ``sum(max(|x_j| - t_j, 0))``. The top-k sum of a
    channel is ``k * t + excess(t)`` at ``t`` = its k-th largest value and grows only to second
    order as ``t`` moves off it, so a near threshold is almost as good as the true one. A
    histogram of a seeded ``HISTOGRAM_SHARE`` of the tokens places the final ``tau`` and
    bridges the thin band between the provisional and the final thresholds; it also gives
    ``r_j``, whose threshold is known only at the end.
    """

    HISTOGRAM_SHARE = 0.125
    CHUNK_ROWS = 512

    def __init__(
        self, channels: int, options: SelectivityThresholds, device: torch.device | str = "cpu"
    ) -> None:
        self.options = options
        self.tokens = 0
        self._abs_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self._histogram = None if options.exact else MagnitudeHistogram(channels, device)
        self._binned = 0
        self._sampler = torch.Generator().manual_seed(0)
        self._values: list[torch.Tensor] = []
        self._result: tuple[torch.Tensor, ...] | None = None
        self._provisional_tau: float | None = None
        self._top_floor: torch.Tensor | None = None
        self._above_tau = torch.zeros(channels, dtype=torch.float64, device=device)
        self._above_floor = torch.zeros(channels, dtype=torch.float64, device=device)
        self._excess = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, flat: torch.Tensor) -> None:
        self.tokens += flat.shape[0]
        self._result = None
        if self._histogram is None:
            magnitudes = flat.abs()
            self._abs_sum += magnitudes.sum(dim=0).double()
            self._values.append(magnitudes)
            return
        keep = torch.rand(flat.shape[0], generator=self._sampler) < self.HISTOGRAM_SHARE
        sample = flat.index_select(0, keep.nonzero().squeeze(1).to(flat.device)).abs()
        if self._provisional_tau is None:
            self._fix_provisional(flat)
        # Cache-sized chunks through two reused buffers: several passes over a chunk cost far
        # less than over the batch. A count above t is the sum of sign(max(|x| - t, 0)), which
        # avoids a bool-to-float copy. fp32 within a batch, fp64 across batches.
        sums = torch.zeros(4, flat.shape[1], device=flat.device)
        rows = min(self.CHUNK_ROWS, flat.shape[0])
        magnitudes = flat.new_empty(rows, flat.shape[1], dtype=torch.float32)
        shifted = torch.empty_like(magnitudes)
        for part in flat.split(rows):
            m, d = magnitudes[: part.shape[0]], shifted[: part.shape[0]]
            torch.abs(part, out=m)
            sums[0] += m.sum(dim=0)
            sums[1] += torch.sub(m, self._provisional_tau, out=d).clamp_min_(0.0).sign_().sum(dim=0)
            torch.sub(m, self._top_floor, out=d).clamp_min_(0.0)
            sums[3] += d.sum(dim=0)
            sums[2] += d.sign_().sum(dim=0)
        sums = sums.double()
        self._abs_sum += sums[0]
        self._above_tau += sums[1]
        self._above_floor += sums[2]
        self._excess += sums[3]
        self._histogram.add(sample)
        self._binned += sample.shape[0]

    def _fix_provisional(self, flat: torch.Tensor) -> None:
        """Thresholds read from a histogram of the first batch: ``tau`` and each top quantile."""
        first = MagnitudeHistogram(flat.shape[1], flat.device)
        for part in flat.split(self.CHUNK_ROWS):
            first.add(part.abs())
        counts, edges = first.counts.double(), first.edges()
        pooled = counts.sum(dim=0, keepdim=True)
        self._provisional_tau = float(_quantiles(pooled, edges, self.options.tau_percentile))
        self._top_floor = _quantiles(counts, edges, self.options.top_quantile).float()

    def _top_count(self) -> int:
        return max(1, round((1.0 - self.options.top_quantile) * self.tokens))

    def _exact(self) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        values = torch.cat(self._values)
        tau = _quantile(values, self.options.tau_percentile)
        active = (values > tau).double().mean(dim=0)
        top = values.topk(self._top_count(), dim=0).values.double().mean(dim=0)
        mean = (self._abs_sum / self.tokens).float()
        relative = (values > mean).double().mean(dim=0)
        return active, tau, top, relative

    def _estimated(self) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        histogram = self._histogram
        # the sampled counts, scaled to stand for every token
        counts = histogram.counts.double() * (self.tokens / max(self._binned, 1))
        edges = histogram.edges()
        # the pooled count at most the provisional threshold is exact; the histogram only
        # moves the threshold across the band to where the count reaches the percentile
        pooled = counts.sum(dim=0, keepdim=True)
        below = self.tokens * counts.shape[0] - float(self._above_tau.sum())
        shift = float(_cdf(pooled, edges, self._provisional_tau)) - below
        share = self.options.tau_percentile + shift / float(pooled.sum())
        tau = float(_quantiles(pooled, edges, share))
        # tokens between the provisional and the final threshold are added (or taken away)
        band = _cdf(counts, edges, self._provisional_tau) - _cdf(counts, edges, tau)
        active = (self._above_tau + band).clamp(0, self.tokens) / self.tokens
        k = self._top_count()
        floor = self._top_floor.double()
        # the k-th largest value q is where the exact count above the floor, moved across the
        # band by the histogram, reaches k; the count is taken as linear across the band
        above = self._above_floor
        kth = _quantiles(counts, edges, (_cdf(counts, edges, floor) + above - k) / self.tokens)
        top_sum = k * floor + self._excess - 0.5 * (above - k) * (kth - floor)
        # the channel's own mean is known only now: the sampled histogram counts above it
        mean = self._abs_sum / self.tokens
        relative = (1.0 - _cdf(counts, edges, mean) / self.tokens).clamp(0.0, 1.0)
        return active, tau, top_sum / k, relative

    def result(self) -> tuple[torch.Tensor, ...]:
        """``(spikiness, p, r)``, each (channels,): ``p_j`` active share above the global
        ``tau``, ``r_j`` above the channel's own mean; the rates as computed (fp64 or fp32)."""
        if self._result is None:
            if self.tokens == 0:
                raise ValueError("no tokens were seen")
            active, _, top, relative = (
                self._exact() if self._histogram is None else self._estimated()
            )
            mean = self._abs_sum / self.tokens
            spikiness = (top / (mean + self.options.eps)).clamp(1.0, self.options.spiky_clip)
            self._result = (spikiness.float(), active, relative)
        return self._result

    @property
    def tau(self) -> float:
        """The activity threshold (for inspection and tests)."""
        return (self._exact() if self._histogram is None else self._estimated())[1]


class ClassStats:
    """Per-class, per-channel sums for the Fisher ratio; tokens labelled -1 are ignored."""

    def __init__(self, channels: int, classes: int, device: torch.device | str = "cpu") -> None:
        self.classes = classes
        self.counts = torch.zeros(classes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(classes, channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros(classes, channels, dtype=torch.float64, device=device)

    def add(self, flat: torch.Tensor, labels: torch.Tensor) -> None:
        self.fold(*self.terms(flat, labels))

    def terms(
        self, flat: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch's class counts (fp64), per-class sums and sums of squares (fp32)."""
        keep = labels >= 0
        values, labels = flat[keep], labels[keep].to(flat.device)
        counts = torch.bincount(labels, minlength=self.classes).double()
        # fp32 within a batch, fp64 across batches: exact enough and several times faster
        shape = (self.classes, flat.shape[1])
        sums = torch.zeros(shape, device=flat.device).index_add_(0, labels, values)
        squares = torch.zeros(shape, device=flat.device).index_add_(0, labels, values.square())
        return counts, sums, squares

    def fold(self, counts: torch.Tensor, sums: torch.Tensor, squares: torch.Tensor) -> None:
        self.counts += counts
        self.sums += sums.double()
        self.squares += squares.double()

    def reset(self) -> None:
        for total in (self.counts, self.sums, self.squares):
            total.zero_()

    def fisher(self, eps: float = 1e-10) -> torch.Tensor:
        """Between-class over within-class variance of every channel, (channels,) float32."""
        seen = self.counts > 0
        counts, sums, squares = self.counts[seen], self.sums[seen], self.squares[seen]
        if counts.numel() == 0:
            raise ValueError("no labelled tokens were seen")
        class_means = sums / counts.unsqueeze(1)
        overall = sums.sum(dim=0) / counts.sum()
        between = (counts.unsqueeze(1) * (class_means - overall).square()).sum(dim=0)
        within = (squares - counts.unsqueeze(1) * class_means.square()).sum(dim=0).clamp_min(0)
        return (between / (within + eps)).float()


def token_classes(
    windows: torch.Tensor, classes: int, counted: torch.Tensor | None = None
) -> torch.Tensor:
    """Label every token with its rank among the ``classes`` most frequent ids, or -1.

    With ``counted`` (shaped like ``windows``) only the tokens it marks are ranked: padding
    and chat-template tokens, which the statistics never see, take no class. Ties in
    frequency go to the lower token id, so the labels are deterministic.
    """
    if classes <= 0:
        raise SecateursError(f"the number of token classes must be > 0, got {classes}")
    ids = windows.reshape(-1).long()
    ranked = ids if counted is None else ids[counted.reshape(-1)]
    frequency = torch.bincount(ranked, minlength=int(ids.max()) + 1 if ids.numel() else 0)
    order = torch.argsort(-frequency, stable=True)[:classes]
    order = order[frequency[order] > 0]
    lookup = torch.full_like(frequency, -1)
    lookup[order] = torch.arange(order.numel())
    return lookup[ids].view(windows.shape)


# the most bytes of one temporary Gram band (see ActivationStats._fold_gram)
GRAM_BAND_BYTES = 64 * 2**20


@dataclass
class BatchTerms:
    """What one batch adds to a layer's statistics, before it is folded in.

    Folding terms in batch order gives the same bits whichever process computed them, so a
    data-parallel run can gather every batch's terms and fold them as one process would.
    ``sq`` holds each window's sum of squares per channel, (windows, channels). Unset fields
    are statistics that were not asked for.
    """

    windows: int
    tokens: int
    sq: torch.Tensor
    sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    gram_tokens: int = 0
    class_counts: torch.Tensor | None = None
    class_sums: torch.Tensor | None = None
    class_squares: torch.Tensor | None = None


class ActivationStats:
    """Running statistics of one linear layer's input, accumulated in fp32 (sums in fp64).

    ``sq_norm[j]`` follows the reference Wanda update exactly: for a batch of ``b`` windows,
    ``s <- s * n / (n + b); n <- n + b; s <- s + ||X_j||^2 / n``, so it is the mean over
    windows of each window's sum of ``x_j^2``. Further statistics are gathered as ``request``
    asks. With ``keep_terms`` every batch's :class:`BatchTerms` are also kept in ``terms``.
    """

    def __init__(
        self,
        in_features: int,
        device: torch.device | str = "cpu",
        request: StatsRequest | None = None,
        keep_terms: bool = False,
    ) -> None:
        request = request or StatsRequest()
        self.in_features = in_features
        self.request = request
        self.windows = 0
        self.tokens = 0
        self.gram_tokens = 0
        self.terms: list[BatchTerms] | None = [] if keep_terms else None
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._sum = (
            torch.zeros(in_features, dtype=torch.float64, device=device) if request.mean else None
        )
        self._gram = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
            if request.gram
            else None
        )
        # A fixed seed keeps the sampled Gram, and every report built on it, reproducible.
        self._sampler = torch.Generator().manual_seed(0)
        self._selectivity = (
            SelectivityStats(in_features, request.selectivity, device)
            if request.selectivity
            else None
        )
        self._classes = (
            ClassStats(in_features, request.classes, device) if request.classes else None
        )

    def add_batch(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Fold in layer inputs shaped (windows, tokens, in_features), labels (windows, tokens).

        ``keep`` (windows, tokens) selects the tokens that count (prompt/response data counts
        response tokens); every window still counts once in the Wanda average.
        """
        if inputs.dim() == 2:
            inputs = inputs.unsqueeze(0)
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        if keep is not None:
            selected = keep.reshape(-1).to(flat.device)
            flat = flat[selected]
            labels = None if labels is None else labels.reshape(-1)[selected]
        terms = BatchTerms(inputs.shape[0], flat.shape[0], self._window_norms(inputs, keep))
        if self._sum is not None:
            terms.sum = flat.sum(dim=0)  # fp32 within a batch, fp64 across
        if self._gram is not None:
            fraction = self.request.gram_fraction
            rows = flat if fraction >= 1.0 else flat[self._sample(flat.shape[0], fraction)]
            terms.gram_tokens = rows.shape[0]
            if self.terms is None:
                self._fold_gram(rows)
            else:  # kept for a data-parallel gather: the whole product
                terms.gram = rows.t() @ rows
        if self._selectivity is not None:
            self._selectivity.add(flat)
        if self._classes is not None:
            if labels is None:
                raise ValueError("class statistics need the token labels of every batch")
            counts, sums, squares = self._classes.terms(flat, labels.reshape(-1))
            terms.class_counts, terms.class_sums, terms.class_squares = counts, sums, squares
        if self.terms is not None:
            self.terms.append(terms)
        self.fold(terms)

    def _fold_gram(self, rows: torch.Tensor) -> None:
        """Add ``rows^T rows`` to the Gram a band of columns at a time, so that the product's
        temporary stays within ``GRAM_BAND_BYTES`` (485 MB whole at 11008 channels). Bands
        apply from 4097 channels; there the sums were those of the whole product bit for bit
        (AMD EPYC, 4096-11008 channels, 128-16384 tokens)."""
        columns = rows.shape[1]
        band = max(1, GRAM_BAND_BYTES // (rows.element_size() * columns))
        for start in range(0, columns, band):
            stop = min(start + band, columns)
            self._gram[:, start:stop].add_(rows.t() @ rows[:, start:stop])

    def fold(self, terms: BatchTerms) -> None:
        """Add one batch's terms (the selectivity statistics are not among them)."""
        # the reference folds in one window per step; doing the same makes the norms (and so
        # the masks) the same at every batch size, and in every process, bit for bit
        for window in terms.sq:
            self.sq_norm.mul_(self.windows / (self.windows + 1))
            self.windows += 1
            self.sq_norm.add_(window / self.windows)
        self.tokens += terms.tokens
        if self._sum is not None:
            self._sum.add_(terms.sum.double())
        if self._gram is not None:
            self.gram_tokens += terms.gram_tokens
            if terms.gram is not None:
                self._gram.add_(terms.gram)
        if self._classes is not None:
            self._classes.fold(terms.class_counts, terms.class_sums, terms.class_squares)

    def reset(self) -> None:
        """Forget every batch folded in so far (the kept terms stay)."""
        self.windows = self.tokens = self.gram_tokens = 0
        self.sq_norm.zero_()
        for total in (self._sum, self._gram):
            if total is not None:
                total.zero_()
        if self._classes is not None:
            self._classes.reset()

    def _window_norms(self, inputs: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Each window's sum of squares per channel (of its kept tokens), (windows, channels)."""
        rows = []
        for row in range(inputs.shape[0]):
            part = inputs[row].float()
            if keep is not None:
                part = part[keep[row].to(part.device)]
            rows.append(part.square().sum(dim=0))
        return torch.stack(rows)

    def _sample(self, count: int, fraction: float) -> torch.Tensor:
        """Indices of a seeded random ``fraction`` of ``count`` tokens."""
        keep = torch.rand(count, generator=self._sampler) < fraction
        return keep.nonzero().squeeze(1).to(self.sq_norm.device)

    def _needs(self, value: object, what: str) -> object:
        if value is None:
            raise ValueError(f"this statistic was gathered without {what}")
        return value

    @property
    def norm(self) -> torch.Tensor:
        """Per-channel ``sqrt(s_j)``, the activation factor of the Wanda score."""
        return self.sq_norm.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean of the input over every token seen."""
        return (self._needs(self._sum, "mean") / max(self.tokens, 1)).float()

    @property
    def gram(self) -> torch.Tensor:
        """``X^T X`` summed over the tokens seen, (in, in).

        With ``gram_fraction < 1`` the sum runs over a seeded random sample of that fraction
        of the tokens: an estimate, cheap enough for error reports.
        """
        return self._needs(self._gram, "gram")

    def reweighted(self, gram: torch.Tensor, total: torch.Tensor, tokens: int) -> ActivationStats:
        """A copy whose ``gram``, ``mean`` and token count come from ``gram``, ``total`` (the
        inputs' sum) and ``tokens``, each token weighted as a fit through a norm weighs it; the
        other statistics stay as gathered."""
        view = copy.copy(self)
        view._gram, view._sum = gram, total
        view.tokens = view.gram_tokens = tokens  # the weighted Gram sums over every token
        return view

    @property
    def selectivity_rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p, r)`` as computed, for the IDF forms: see :class:`SelectivityStats`."""
        _, active, relative = self._needs(self._selectivity, "selectivity").result()
        return active, relative

    @property
    def active_rate(self) -> torch.Tensor:
        """Per-channel ``p_j``, the share of tokens with ``|x_j|`` above the global ``tau``."""
        return self.selectivity_rates[0].float()

    @property
    def relative_rate(self) -> torch.Tensor:
        """Per-channel ``r_j``, the share of tokens with ``|x_j|`` above its own mean."""
        return self.selectivity_rates[1].float()

    @property
    def spikiness(self) -> torch.Tensor:
        """Per-channel top-quantile mean over mean of ``|x_j|``: high for peaked channels."""
        return self._needs(self._selectivity, "selectivity").result()[0]

    @property
    def fisher(self) -> torch.Tensor:
        """Per-channel Fisher ratio across the token classes."""
        return self._needs(self._classes, "classes").fisher()
