"""The trainer: fine-tuning with a recommendation (:mod:`.train`), the validation ladder around it
(:mod:`.validate`) and where its runs execute (:mod:`.backends`: in process or on Ray)."""
