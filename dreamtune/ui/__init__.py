"""`dreamtune ui`: a web UI (Gradio) over the same Python API and CLI.

Train (a separate `dreamtune train` process per run), Sample, Compare and Runs tabs; everything the UI
shows of a run is read from its run folder. Needs the optional extra: `pip install dreamtune[ui]`.
"""
