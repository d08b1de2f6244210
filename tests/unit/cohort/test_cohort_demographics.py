"""Demographics and the finding, drawn without rendering images."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from shiftguard.cohort.demographics import (
    age_at,
    allocate_sites,
    finding_probability,
    patient_id,
    sample_subjects,
)
from shiftguard.config.schema import CohortConfig
from shiftguard.errors import CohortError

DEFAULT = Path(__file__).resolve().parents[3] / "conf" / "cohort" / "default.yaml"


def default_config(**update: object) -> CohortConfig:
    cfg = CohortConfig(**yaml.safe_load(DEFAULT.read_text(encoding="utf-8")))
    return cfg.model_copy(update=update)


def test_site_allocation_is_exact_and_proportional() -> None:
    assert allocate_sites([1.0, 1.0, 1.0, 0.6], 200) == [56, 56, 55, 33]
    assert allocate_sites([1.0, 1.0, 1.0, 0.6], 4) == [1, 1, 1, 1]
    for n in (1, 7, 33, 1001):
        counts = allocate_sites([0.2, 3.0, 1.1], n)
        assert sum(counts) == n
        assert np.all(np.abs(np.array(counts) - np.array([0.2, 3.0, 1.1]) / 4.3 * n) < 1)


def test_site_prevalences_and_sizes_are_respected_over_a_large_draw() -> None:
    cfg = default_config(n_subjects=20000)
    plans = sample_subjects(cfg)
    by_site: dict[str, list[bool]] = defaultdict(list)
    for p in plans:
        by_site[p.site].append(p.finding)
        assert cfg.sites[p.site_index].name == p.site
        assert cfg.sites[p.site_index].scanner == p.scanner
    total = sum(s.weight for s in cfg.sites)
    for site in cfg.sites:
        findings = by_site[site.name]
        assert abs(len(findings) / len(plans) - site.weight / total) < 1e-3
        assert np.mean(findings) == pytest.approx(site.prevalence, abs=0.025), site.name
    # site prevalences differ, so the site (and its scanner) is a shortcut to the label
    rates = sorted(float(np.mean(v)) for v in by_site.values())
    assert rates[-1] - rates[0] > 0.2


def test_older_subjects_have_the_finding_more_often() -> None:
    cfg = default_config(n_subjects=6000)
    plans = sample_subjects(cfg)
    pos = [p.age for p in plans if p.finding]
    neg = [p.age for p in plans if not p.finding]
    assert np.mean(pos) > np.mean(neg) + 2.0
    site = cfg.sites[0]
    probs = [finding_probability(site, cfg.lesion, a) for a in (30, 50, 70, 90)]
    assert probs == sorted(probs) and probs[0] < probs[-1]


def test_prevalence_zero_and_one_are_exact() -> None:
    cfg = default_config(n_subjects=400)
    sites = [s.model_copy(update={"prevalence": float(i % 2)}) for i, s in enumerate(cfg.sites)]
    plans = sample_subjects(cfg.model_copy(update={"sites": sites}))
    for p in plans:
        assert p.finding == bool(p.site_index % 2)


def test_dates_and_ages_are_consistent_and_clock_free() -> None:
    cfg = default_config(n_subjects=500)
    plans = sample_subjects(cfg)
    origin = dt.date(2020, 1, 1)
    for p in plans:
        study = p.study_datetime.date()
        assert origin <= study < origin + dt.timedelta(days=730)
        assert age_at(p.birth_date, study) == p.age
        assert 18 <= p.age <= 100
        assert study <= p.report_date <= study + dt.timedelta(days=3)
        assert p.sex in {"M", "F"}
        assert p.reader in cfg.readers
    assert len({p.accession_number for p in plans}) == len(plans)
    assert [p.patient_id for p in plans[:2]] == ["SG0001", "SG0002"]
    assert patient_id(12344, 20000) == "SG12345"


def test_same_seed_same_plans_other_seed_other_plans() -> None:
    a = sample_subjects(default_config(n_subjects=50))
    b = sample_subjects(default_config(n_subjects=50))
    c = sample_subjects(default_config(n_subjects=50, seed=7))
    assert a == b
    assert [(p.age, p.sex, p.finding) for p in a] != [(p.age, p.sex, p.finding) for p in c]


def test_a_negative_seed_is_a_clear_error() -> None:
    with pytest.raises(CohortError, match=r"cohort\.seed"):
        sample_subjects(default_config(n_subjects=3, seed=-1))
