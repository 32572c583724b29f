"""Reports: one self-contained HTML file per run, and run-vs-run comparisons."""
