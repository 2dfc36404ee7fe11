from train_fixtures import *
