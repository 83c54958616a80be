-- labelled: every photo that has an individual. For curated sets (already cropped and checked)
-- where no quality filter applies; the train stage leaves singletons out of training itself.
SELECT * FROM images WHERE individual_id IS NOT NULL AND individual_id <> ''
