from train_fixtures import *  # noqa: F401,F403  (tiny model folders and data files)
