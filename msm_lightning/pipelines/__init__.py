"""End-to-end pipelines from the real-audio data to a score table: `msm demo` and `msm benchmark`.

`runs` (run folders: stage log, lock, tools as subprocesses), `inputs` (the data and packages they need),
`contenders` (the compared models), `stages` (resumable stages), `speed` (this machine's measured
pretraining speed), `demo` and `benchmark` (library entry points taking settings), `cli` (their commands).
"""
