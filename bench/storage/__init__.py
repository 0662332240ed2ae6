"""The results store: validated records (trainings, clean evaluations, cells) in one SQLite
database, and the merge of databases. It stands on the foundation layer alone; the leaderboard
reads only this layer and the foundation."""
