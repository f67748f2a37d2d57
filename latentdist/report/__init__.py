"""Reports: tables, figures and files for measurements and comparisons."""
