# Include directories that enforce the layering api -> runtime -> {gpu, cpu_index, transfer} ->
# common. No target adds the project root to its include path: a module sees
#   - its own public headers, include/kvrt_<module>/*.h (PUBLIC, so what links it sees them too),
#   - the public headers of the modules it links (target_link_libraries), and nothing else,
#   - its own private headers in src/ (PRIVATE, below).
# tests/ are white-box and keep the project root.

# kvrt_source_view(out dir): an include root in the build tree under which `dir` (a folder of the
# source tree) appears at its path from the project root, and nothing else does. With it the CLI
# includes "tools/trace/trace.h" (spelled from the root) while no module's src/ is in reach.
# Sets `out` to the include root.
function(kvrt_source_view out dir)
  file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR} ${dir})
  string(REPLACE "/" "_" name ${rel})
  set(root ${PROJECT_BINARY_DIR}/source_views/${name})
  get_filename_component(parent ${root}/${rel} DIRECTORY)
  file(MAKE_DIRECTORY ${parent})
  file(CREATE_LINK ${dir} ${root}/${rel} SYMBOLIC)
  set(${out} ${root} PARENT_SCOPE)
endfunction()

# kvrt_module_includes(target): PUBLIC include/ of the calling module's folder, PRIVATE its src/
# (a module's private headers are included by their file name: "kinds.h", "cold_tier.h").
function(kvrt_module_includes target)
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/include)
    target_include_directories(${target} PUBLIC
      $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include>)
  endif()
  if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/src)
    target_include_directories(${target} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  endif()
endfunction()
