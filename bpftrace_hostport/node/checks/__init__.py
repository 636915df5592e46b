"""The checks of `check`, one module per family of findings (node/findings.py declares them):
forward.py (the forward path), nat.py (NAT plumbing), conntrack.py, pods.py (pods and ports),
localhost.py. Each exposes `run(view) -> [Finding]`, pure over a NodeView (node/nodeview.py);
node/check.py runs them all.
"""
