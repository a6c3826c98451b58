"""Results of many avocado jobs -> an HTML/Markdown qualification matrix, plots, comparisons.

Entry points: `make_report` and `add_parser` (orchestrator.report.cli),
`load_job` (orchestrator.report.jobs), `compare_paths` (orchestrator.report.compare).
"""
