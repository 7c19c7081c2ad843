"""The grid study of the paper's findings F1-F3: its runs (run.py) and its report (report.py)."""
