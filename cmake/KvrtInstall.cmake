# cmake --install: header, both libraries, kvrtConfig.cmake (find_package(kvrt)) and kvrt.pc.
# The shared library and the static one are in separate export sets: kvrtTargets.cmake (kvrt::kvrt,
# no dependencies) and kvrtStaticTargets.cmake (kvrt::kvrt_static, loaded by the `static`
# component together with the packages it links).
include(CMakePackageConfigHelpers)
set(kvrt_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/kvrt)
# kvrt.h is the shared library's PUBLIC_HEADER: installed once, here.
install(TARGETS kvrt EXPORT kvrtTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  PUBLIC_HEADER DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS kvrt_static EXPORT kvrtStaticTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT kvrtTargets NAMESPACE kvrt:: DESTINATION ${kvrt_cmake_dir})
install(EXPORT kvrtStaticTargets NAMESPACE kvrt:: DESTINATION ${kvrt_cmake_dir})
# Written below the build tree's root, not at it: find_package searches <prefix>/ for a config
# file, and one there without its targets file (a build dir on CMAKE_PREFIX_PATH) fails to load.
set(kvrt_config_out ${PROJECT_BINARY_DIR}/cmake-install)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/kvrtConfig.cmake.in
  ${kvrt_config_out}/kvrtConfig.cmake INSTALL_DESTINATION ${kvrt_cmake_dir})
# While the major version is 0 each minor version has its own ABI (its own soname, kvrt.h "ABI"):
# find_package(kvrt 0.2) must not accept 0.3.
write_basic_package_version_file(${kvrt_config_out}/kvrtConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${kvrt_config_out}/kvrtConfig.cmake ${kvrt_config_out}/kvrtConfigVersion.cmake
  DESTINATION ${kvrt_cmake_dir})

# kvrt.pc is written at install time, so it names the prefix actually installed to
# (`cmake --install B --prefix P`), not the one configured (CMAKE_INSTALL_PREFIX at configure time).
# DESTDIR stays out of it, as it should for a staged install. A relative --prefix is made absolute
# (pkg-config's callers run anywhere). Libs names the shared library only: the static one needs its
# dependencies, which only the CMake package (COMPONENTS static) brings.
foreach(dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${dir}}")
    set(kvrt_pc_${dir} "${CMAKE_INSTALL_${dir}}")
  else()
    set(kvrt_pc_${dir} "\\\${prefix}/${CMAKE_INSTALL_${dir}}")  # `${prefix}` in the .pc file
  endif()
endforeach()
# With a relative libdir the prefix is the .pc file's own place (${pcfiledir}/../..), so that a
# prefix copied or moved elsewhere names itself, not the tree it was installed to.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(kvrt_pc_prefix_code "get_filename_component(KVRT_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\" ABSOLUTE)")
else()
  file(RELATIVE_PATH kvrt_pc_up "/p/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/p")
  string(REGEX REPLACE "/$" "" kvrt_pc_up "${kvrt_pc_up}")
  set(kvrt_pc_prefix_code "set(KVRT_PC_PREFIX \"\\\${pcfiledir}/${kvrt_pc_up}\")")
endif()
install(CODE "
  ${kvrt_pc_prefix_code}
  set(KVRT_PC_LIBDIR \"${kvrt_pc_LIBDIR}\")
  set(KVRT_PC_INCLUDEDIR \"${kvrt_pc_INCLUDEDIR}\")
  set(PROJECT_VERSION ${PROJECT_VERSION})
  configure_file(\"${PROJECT_SOURCE_DIR}/cmake/kvrt.pc.in\" \"${PROJECT_BINARY_DIR}/pkgconfig/kvrt.pc\"
    @ONLY)")
install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/kvrt.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
