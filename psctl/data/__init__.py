"""Reading training and prediction input: CSV (:mod:`.csvfile`), LIBSVM and hashed CSV
(:mod:`.formats`), ratings (:mod:`.ratings`) and their vocabularies (:mod:`.vocab`)."""
