-- The databases of the team stack: MLflow's backend store and the Prefect server's database.
-- Run once on an empty data directory, as the superuser: compose.yaml mounts this file into the
-- postgres image's /docker-entrypoint-initdb.d; team.py runs it with psql after initdb.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
