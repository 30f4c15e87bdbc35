"""`valle prepare`: voices/{group}/{speaker}/ audio -> a training dataset."""
