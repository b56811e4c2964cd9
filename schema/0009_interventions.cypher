// 0009: interventions and steering vectors. One (:Intervention {id}) per intervention spec (its
// content hash, so re-running a spec is idempotent), one (:SteeringVector {name}) per concept
// vector.
CREATE CONSTRAINT intervention_id IF NOT EXISTS FOR (i:Intervention) REQUIRE i.id IS UNIQUE;
CREATE CONSTRAINT steering_vector_name IF NOT EXISTS FOR (v:SteeringVector) REQUIRE v.name IS UNIQUE;
