-- Argo CD health of a tenantry.dev Tenant, from the status the operator writes
-- (operator/tenantry_operator/reconcile.py). Argo CD runs custom checks without the string
-- library: only the base, table and (safe) os libraries, so no string methods here.
local hs = {status = "Progressing", message = "Waiting for the Tenantry operator"}

local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function explain(c)
  if c == nil then
    return ""
  end
  if c.message ~= nil and c.message ~= "" then
    return tostring(c.reason) .. ": " .. c.message
  end
  return tostring(c.reason)
end

local status = obj.status
local generation = obj.metadata.generation

if obj.metadata.deletionTimestamp ~= nil then
  local finalized = condition(status, "Finalized")
  if finalized ~= nil and finalized.status == "False" then
    hs.status = "Degraded"
    hs.message = "Deletion blocked, retrying: " .. explain(finalized)
  else
    hs.message = "Deleting"
  end
  return hs
end

if status == nil or status.observedGeneration == nil then
  return hs
end

if generation ~= nil and status.observedGeneration < generation then
  hs.message = "Waiting for the operator to reconcile generation " .. generation
    .. " (status is of generation " .. status.observedGeneration .. ")"
  return hs
end

local migration = status.migration
if migration ~= nil and migration.step ~= nil and migration.step ~= "Done" then
  hs.message = "Isolation upgrade " .. tostring(migration.from) .. " to " .. tostring(migration.to)
    .. ": " .. migration.step
  if migration.rowsTotal ~= nil then
    hs.message = hs.message .. " (" .. (migration.rowsCopied or 0) .. " of "
      .. migration.rowsTotal .. " rows copied)"
  end
  return hs
end

local ready = condition(status, "Ready")
if ready == nil then
  return hs
end

-- Failed: a reason retrying alone will not fix (a conflict, a lowered isolation, lost
-- credentials, a plan that forbids the isolation); it stays until someone acts.
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(ready)
  return hs
end

if ready.status == "True" then
  if status.phase == "Suspended" or (obj.spec ~= nil and obj.spec.suspended == true) then
    hs.status = "Suspended"
    hs.message = "Suspended: the runtime refuses the tenant's requests; data and keys are kept"
    return hs
  end
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

-- Not Ready for a reason the operator retries on its own (a silo Pod starting, a plan not
-- applied yet, a database not reachable yet).
hs.message = explain(ready)
return hs
