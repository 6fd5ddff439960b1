"""Analysis of a study's runs (studies/<name>/ or a sweep directory): reading them, their statistics, their figures,
the Markdown report, and publishing a sweep's results into the study.

    runs.py          a study's runs: configs, metrics, status, arms, per-run summaries, class names
    significance.py  means with t intervals, Welch's test, Holm's correction, the verdicts in words
    time_to_fid.py   how much sooner each arm reaches the baseline's FID, in FLOPs and in training time
    plots.py         the report's figures: curves with seed bands, sample grids, FID against cost
    report.py        the report's sections, assembled: python -m dit.analysis.report
    study.py         a study's results into and out of its sweep: python -m dit.analysis.study publish|restore

Each module imports only those above it in this list (study.py none of them).
"""
