"""Data sets: the synthetic corpus and tasks, task subsets, the offline real-audio builder (`msm data`)."""
