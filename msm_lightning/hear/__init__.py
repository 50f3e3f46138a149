"""The HEAR side: the HEAR API over our models, the 40 ms grid, task and embedding folders, `msm embed`."""
