// 0009: interventions, faithfulness reports and steering vectors. One (:Intervention {id}) per
// intervention spec (its content hash, so re-running a spec is idempotent), one
// (:FaithfulnessReport {prompt_id}) per validated prompt, one (:SteeringVector {name}) per
// concept vector.
CREATE CONSTRAINT intervention_id IF NOT EXISTS FOR (i:Intervention) REQUIRE i.id IS UNIQUE;
CREATE CONSTRAINT faithfulness_prompt IF NOT EXISTS FOR (r:FaithfulnessReport) REQUIRE r.prompt_id IS UNIQUE;
CREATE CONSTRAINT steering_vector_name IF NOT EXISTS FOR (v:SteeringVector) REQUIRE v.name IS UNIQUE;
