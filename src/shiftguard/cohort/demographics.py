"""Who is in the cohort: site, age, sex, the finding, study dates and RIS fields; no images.

Pure and cheap, so the cohort's demographics can be drawn and checked without rendering a voxel. The
finding's probability rises with age (``lesion.age_log_odds_per_decade`` around the site's mean age)
and its intercept is calibrated per site so that the expected prevalence over the site's age
distribution equals ``site.prevalence``: demographics correlate with the finding and sites differ,
which is what lets a model learn shortcuts, as in real multi-site data.

Every draw uses ``np.random.default_rng([seed, subject, stream])``; a subject's values do not depend
on any other subject's, except for the site allocation (exact shares of ``site.weight``, shuffled).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from shiftguard.config.schema import CohortConfig, LesionConfig, SiteConfig
from shiftguard.errors import CohortError

#: independent random streams per subject (the third entropy word)
STREAM_DEMOGRAPHICS = 0
STREAM_ANATOMY = 1
STREAM_LESION = 2
STREAM_SCANNER = 3
STREAM_TISSUE = 4
STREAM_LESION_TISSUE = 5
#: the site allocation's stream (a two-word entropy: it belongs to no subject)
STREAM_ALLOCATION = 0x517E

AGE_RANGE = (18.0, 100.0)
STUDY_PERIOD_DAYS = 730


@dataclass(frozen=True)
class SubjectPlan:
    """One subject's demographics, finding and RIS fields.

    Attributes:
        index: 0-based position in the cohort.
        patient_id: ``SG`` + 1-based zero-padded index, e.g. ``SG0001``.
        site_index: index into ``CohortConfig.sites``.
        site: the site's name (InstitutionName).
        scanner: key into ``CohortConfig.scanners``.
        age: completed years at the study date.
        sex: ``"M"`` or ``"F"``.
        finding: whether the subject has the focal lesion.
        finding_probability: the probability the finding was drawn with.
        study_datetime: date and time of the study (no wall clock involved).
        birth_date: consistent with ``age`` at the study date.
        accession_number: the RIS accession number.
        reader: the radiologist who verified the diagnosis.
        report_date: date of the verified report.
    """

    index: int
    patient_id: str
    site_index: int
    site: str
    scanner: str
    age: int
    sex: str
    finding: bool
    finding_probability: float
    study_datetime: dt.datetime
    birth_date: dt.date
    accession_number: str
    reader: str
    report_date: dt.date


def subject_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one subject's ``stream`` (see the ``STREAM_*`` constants).

    Raises:
        CohortError: ``seed`` is negative (numpy seeds must be non-negative).
    """
    if seed < 0:
        raise CohortError(f"cohort.seed: must be a non-negative integer, got {seed}")
    return np.random.default_rng([seed, index, stream])


def patient_id(index: int, n_subjects: int, prefix: str = "SG") -> str:
    """``prefix`` + the 1-based index, zero-padded to at least 4 digits.

    >>> patient_id(0, 200)
    'SG0001'
    """
    width = max(4, len(str(n_subjects)))
    return f"{prefix}{index + 1:0{width}d}"


def allocate_sites(weights: Sequence[float], n: int) -> list[int]:
    """Subjects per site in proportion to ``weights``, by largest remainder (sums to ``n``).

    >>> allocate_sites([1.0, 1.0, 1.0, 0.6], 200)
    [56, 56, 55, 33]
    """
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * n
    counts = np.floor(exact).astype(int)
    short = n - int(counts.sum())
    # ties broken by site order, so the result is stable
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return [int(c) for c in counts]


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def finding_intercept(site: SiteConfig, lesion: LesionConfig) -> float:
    """The log-odds at the site's mean age that make the site's expected prevalence exact.

    Solves ``E[sigmoid(b0 + beta * (age - age_mean) / 10)] = prevalence`` over the site's (clipped)
    normal age distribution by Gauss-Hermite quadrature. Returns ``-inf``/``inf`` for prevalence 0/1.
    """
    p = site.prevalence
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    beta = lesion.age_log_odds_per_decade
    nodes, weights = np.polynomial.hermite.hermgauss(48)
    ages = np.clip(site.age_mean + math.sqrt(2.0) * site.age_sd * nodes, *AGE_RANGE)
    z = (ages - site.age_mean) / 10.0
    w = weights / math.sqrt(math.pi)

    def gap(b0: float) -> float:
        return float(np.sum(w * _sigmoid(b0 + beta * z))) - p

    return float(optimize.brentq(gap, -60.0, 60.0, xtol=1e-12))


def finding_probability(site: SiteConfig, lesion: LesionConfig, age: float) -> float:
    """Probability that a subject of ``age`` at ``site`` has the finding.

    Args:
        site: the subject's site (its prevalence and mean age).
        lesion: the finding's config (``age_log_odds_per_decade``).
        age: age in years.

    Returns:
        A probability in ``[0, 1]``; rises with age when ``age_log_odds_per_decade > 0``.
    """
    b0 = finding_intercept(site, lesion)
    if math.isinf(b0):
        return 0.0 if b0 < 0 else 1.0
    beta = lesion.age_log_odds_per_decade
    return float(_sigmoid(b0 + beta * (age - site.age_mean) / 10.0))


def _minus_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a non-leap year
        return day.replace(year=day.year - years, day=28)


def age_at(birth: dt.date, day: dt.date) -> int:
    """Completed years between ``birth`` and ``day``.

    >>> age_at(dt.date(1960, 3, 1), dt.date(2020, 2, 29))
    59
    """
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def sample_subjects(cfg: CohortConfig) -> list[SubjectPlan]:
    """Draw every subject's site, demographics, finding and RIS fields.

    Args:
        cfg: the cohort configuration (``seed``, ``n_subjects``, ``sites``, ``lesion``, ``readers``,
            ``study_date_origin``).

    Returns:
        ``n_subjects`` plans in subject order.

    Raises:
        CohortError: a negative seed, no readers, or a bad ``study_date_origin``.
    """
    if not cfg.readers:
        raise CohortError("cohort.readers: at least one reader is needed for the RIS table")
    try:
        origin = dt.datetime.strptime(cfg.study_date_origin, "%Y%m%d").date()
    except ValueError:
        raise CohortError(
            f"cohort.study_date_origin: {cfg.study_date_origin!r} is not a valid YYYYMMDD date"
        ) from None
    counts = allocate_sites([s.weight for s in cfg.sites], cfg.n_subjects)
    site_of = np.repeat(np.arange(len(cfg.sites)), counts)
    subject_rng(cfg.seed, 0, 0)  # validates the seed
    np.random.default_rng([cfg.seed, STREAM_ALLOCATION]).shuffle(site_of)
    intercepts = [finding_intercept(s, cfg.lesion) for s in cfg.sites]

    plans = []
    for index in range(cfg.n_subjects):
        site_index = int(site_of[index])
        site = cfg.sites[site_index]
        rng = subject_rng(cfg.seed, index, STREAM_DEMOGRAPHICS)
        age_years = float(np.clip(rng.normal(site.age_mean, site.age_sd), *AGE_RANGE))
        sex = "F" if rng.random() < site.female_fraction else "M"
        b0 = intercepts[site_index]
        if math.isinf(b0):
            prob = 0.0 if b0 < 0 else 1.0
        else:
            z = (age_years - site.age_mean) / 10.0
            prob = float(_sigmoid(b0 + cfg.lesion.age_log_odds_per_decade * z))
        finding = bool(rng.random() < prob)
        study_day = origin + dt.timedelta(days=int(rng.integers(0, STUDY_PERIOD_DAYS)))
        minute = int(rng.integers(7 * 60, 19 * 60))
        second = int(rng.integers(0, 60))
        study_datetime = dt.datetime.combine(study_day, dt.time(minute // 60, minute % 60, second))
        age = int(age_years)
        # born 0..364 days before the age-th birthday preceding the study, so age_at(...) == age
        birth = _minus_years(study_day, age) - dt.timedelta(days=int(rng.integers(0, 365)))
        reader = cfg.readers[int(rng.integers(0, len(cfg.readers)))]
        report = study_day + dt.timedelta(days=int(rng.integers(0, 4)))
        plans.append(
            SubjectPlan(
                index=index,
                patient_id=patient_id(index, cfg.n_subjects, cfg.patient_prefix),
                site_index=site_index,
                site=site.name,
                scanner=site.scanner,
                age=age_at(birth, study_day),
                sex=sex,
                finding=finding,
                finding_probability=prob,
                study_datetime=study_datetime,
                birth_date=birth,
                accession_number=f"{cfg.accession_prefix}{study_day:%y}{index + 1:06d}",
                reader=reader,
                report_date=report,
            )
        )
    return plans
