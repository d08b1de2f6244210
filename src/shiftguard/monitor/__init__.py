"""Drift monitoring: PHI-free feature records from the edge, their collection, drift against the
bundle's reference (fast tests matching Evidently's defaults, a unified score), Evidently reports
and dashboards, alert rules, and the scenarios that show what is detected and when."""
