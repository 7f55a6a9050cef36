"""Empirical privacy auditing with one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

`bound`: the lower bound ε_lb from the number of correct guesses; `canaries`: white-box gradient
canaries inserted into one client's DP sum and scored from what the server sees; `run`: the
`fedlora audit` command (one audited training run → `audit.json`, `audit.md`).
"""
