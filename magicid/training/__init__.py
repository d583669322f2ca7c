"""Training MagicID's adapters: MMF schedule (mmf.py), Clone Face Tuning (clone_face.py), dataset, trainer."""
