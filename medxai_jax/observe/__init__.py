"""Watching a run: TensorBoard summaries, progress lines with rate and ETA, profiles, timings.

`summaries` writes TensorBoard event files (tensorboardX, no TensorFlow) from process 0;
`progress` logs done/total, rate and ETA of a long phase at a steady cadence; `profiling`
traces chosen training steps with `jax.profiler`; `timing` records each phase's wall and
compilation seconds in `<workdir>/timings.json` for the run's report.
"""
