"""xenicorn's xenstored: the store (:mod:`.store`) and the guest's ring (:mod:`.server`)."""
