"""mathtune.model.load"""
