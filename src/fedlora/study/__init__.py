"""Many runs and what they add up to: `fedlora sweep` and `fedlora report`.

grid.py     a grid file (a config whose keys may hold lists, plus [sweep], [select], [[cases]])
            → validated, expanded settings, each with its run-folder name
select.py   choosing a key (the learning rate) per method on the validation split, pure
sweep.py    runs the settings one after another through `fedlora.run`, skipping complete run
            folders and resuming interrupted ones
runs.py     reads complete run folders back (config, summary, metrics)
table.py    runs grouped by setting: mean ± std over seeds; CSV and Markdown
plots.py    the figures (matplotlib, no global pyplot state)
report.py   `fedlora report DIR...`: the table, the plots and report.md, written together
"""
