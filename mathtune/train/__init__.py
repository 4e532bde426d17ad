"""mathtune.train.recipe"""
